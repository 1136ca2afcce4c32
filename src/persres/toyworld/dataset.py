"""Toy concepts as a CustomConcept101-format dataset, so ``persres benchmark`` runs on them unchanged.

Each concept's image folder is named ``{class}_{colour}_{pattern}`` (its prefix, the class, is the
category, as "pet" is in CustomConcept101's "pet_dog1"); its prompt file holds the prompts with
``{}`` where the concept goes. ``toy_nouns`` is the noun list for ``--class-source nearest``: the toy
CLIP's tokenizer knows only toy words, so WordNet's nouns would be read as strings of letters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from persres.toyworld.prompts import Instance
from persres.toyworld.scenes import CLASSES, PLACES, SECOND_OBJECTS


def concept_name(instance: Instance) -> str:
    return "_".join(instance)


def write_cc101(root: Path, concepts: list[tuple[Instance, Path, list[str]]]) -> Path:
    """``root``/dataset.json, prompts/ and benchmark_dataset/ for (instance, photo folder, templates)."""
    for instance, _, templates in concepts:  # check everything before writing anything
        if not all("{}" in line for line in templates):
            raise ValueError(
                f"{concept_name(instance)}: every prompt template needs {{}} where the concept goes"
            )
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    entries = []
    for instance, photos, templates in concepts:
        name = concept_name(instance)
        (root / "prompts" / f"{name}.txt").write_text("\n".join(templates) + "\n")
        shutil.copytree(photos, root / "benchmark_dataset" / name, dirs_exist_ok=True)
        entries.append(
            {
                "instance_prompt": f"photo of a <new1> {instance[0]}",
                "class_prompt": instance[0],
                "instance_data_dir": f"./benchmark_dataset/{name}",
                "prompt_filename": f"prompts/{name}.txt",
            }
        )
    (root / "dataset.json").write_text(json.dumps(entries, indent=2) + "\n")
    return root


def toy_nouns() -> list[str]:
    """Every noun of the toy vocabulary: object classes, second objects, places."""
    return sorted(set(CLASSES) | set(SECOND_OBJECTS) | set(PLACES))
