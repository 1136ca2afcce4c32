"""CustomConcept101-format datasets: dataset.json, image folders, prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from persres.errors import InputError
from persres.evaluation.cc101 import load_dataset


def make_dataset(root: Path, prompt_lines: str, data_dir: str = "./images/pet_dog") -> Path:
    (root / "images" / "pet_dog").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "pet_dog" / "a.png")
    (root / "p.txt").write_text(prompt_lines)
    entry = {"class_prompt": "dog", "instance_data_dir": data_dir, "prompt_filename": "p.txt"}
    (root / "dataset.json").write_text(json.dumps([entry]))
    return root


def test_prompt_files_written_with_the_modifier_token(tmp_path: Path) -> None:
    entry = load_dataset(make_dataset(tmp_path, "<new1> dog swimming in a pool\na photo of {}\n"))[0]
    assert entry.prompts == ("V* dog swimming in a pool", "a photo of V* dog")
    assert entry.prompts_with("beagle") == ("V* beagle swimming in a pool", "a photo of V* beagle")
    (tmp_path / "p.txt").write_text("a dog without the concept\n")
    with pytest.raises(InputError, match="needs a \\{\\} or <new1>"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("data_dir", [".", "./", "images/\x00x"])
def test_odd_dataset_paths_are_refused(tmp_path: Path, data_dir: str) -> None:
    with pytest.raises(InputError, match="dataset folder itself|NUL"):
        load_dataset(make_dataset(tmp_path, "{}\n", data_dir))


def test_non_utf8_prompt_files_are_named(tmp_path: Path) -> None:
    make_dataset(tmp_path, "{}\n")
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(InputError, match="p.txt is not UTF-8"):
        load_dataset(tmp_path)
