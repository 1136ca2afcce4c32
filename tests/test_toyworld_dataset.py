"""Toy concepts written as a CustomConcept101-format dataset load through persres's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from persres.evaluation.cc101 import load_dataset
from persres.toyworld.dataset import toy_nouns, write_cc101
from persres.toyworld.experiment import reference_photos
from persres.toyworld.model import toy_tokenizer
from persres.toyworld.scenes import CLASSES, HELD_OUT


def test_written_dataset_loads_with_the_benchmark_reader(tmp_path: Path) -> None:
    concepts = []
    for instance in HELD_OUT[:2]:
        photos = reference_photos(instance, tmp_path / "photos" / instance[0], count=3)
        concepts.append((instance, photos, ["a photo of {}", "{} on the beach"]))
    entries = load_dataset(write_cc101(tmp_path / "cc101", concepts))
    assert [e.name for e in entries] == ["dog_red_striped", "cat_blue_dotted"]
    assert [e.category for e in entries] == ["dog", "cat"]
    assert entries[1].prompts == ("a photo of V* cat", "V* cat on the beach")
    assert entries[0].prompts_with("vase")[1] == "V* vase on the beach"
    assert len(list(entries[0].images.iterdir())) == 3


def test_templates_without_a_concept_slot_are_refused(tmp_path: Path) -> None:
    photos = reference_photos(HELD_OUT[0], tmp_path / "photos", count=1)
    with pytest.raises(ValueError, match="dog_red_striped"):
        write_cc101(tmp_path / "cc101", [(HELD_OUT[1], photos, ["{}"]), (HELD_OUT[0], photos, ["a dog"])])
    assert not (tmp_path / "cc101").exists()  # nothing half-written


def test_toy_nouns_are_single_tokens_and_include_every_class() -> None:
    tokenizer = toy_tokenizer()
    nouns = toy_nouns()
    assert set(CLASSES) <= set(nouns) and "beach" in nouns
    assert all(len(tokenizer.tokenize(noun)) == 1 for noun in nouns)
