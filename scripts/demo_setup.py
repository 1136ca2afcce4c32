"""Set up the demo: five photos of a held-out toy-world concept (a red striped dog, never seen by
the shipped base model) and a one-concept CustomConcept101-format dataset around them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from persres.toyworld.experiment import reference_photos
from persres.toyworld.scenes import HELD_OUT

CONCEPT = HELD_OUT[0]  # ("dog", "red", "striped")
DEMO_PROMPTS = (  # one prompt of each of the supplement's six kinds, in CustomConcept101's {} form
    "a photo of {}",
    "{} on the beach",
    "a blue {}",
    "a painting of {}",
    "{} with a ball",
    "a cup in the style of {}",
)


def write_dataset(root: Path, photos: Path) -> None:
    """A one-concept CustomConcept101-format folder around the demo photos."""
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "dog.txt").write_text("\n".join(DEMO_PROMPTS) + "\n")
    entry = {
        "instance_prompt": "photo of a <new1> dog",
        "class_prompt": "dog",
        "instance_data_dir": "./benchmark_dataset/red_striped_dog",
        "prompt_filename": "prompts/dog.txt",
    }
    shutil.copytree(photos, root / "benchmark_dataset" / "red_striped_dog", dirs_exist_ok=True)
    (root / "dataset.json").write_text(json.dumps([entry], indent=2) + "\n")


def main(out: str) -> None:
    root = Path(out)
    photos = reference_photos(CONCEPT, root / "photos", count=5)
    write_dataset(root / "cc101", photos)
    print(f"5 photos of a {' '.join(CONCEPT[1:])} {CONCEPT[0]} in {photos}; dataset in {root / 'cc101'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
