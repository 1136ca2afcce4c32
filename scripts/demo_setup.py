"""Set up the no-weights demo: a tiny random Stable Diffusion folder, tiny random CLIP and DINO
scorers, five photos of a 'concept' and a one-concept CustomConcept101-format dataset.

The base model has never been trained, so everything it draws is noise: the demo shows the whole
flow (train -> sample -> info -> merge) on a CPU in seconds, not image quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from persres.tiny import save_tiny_clip, save_tiny_dino, save_tiny_pipeline


def write_photos(folder: Path, count: int = 5) -> None:
    """A red-and-white striped square on grey, at a few positions and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = np.full((64, 64, 3), 110, np.uint8)
        side = int(rng.integers(24, 40))
        top, left = (int(v) for v in rng.integers(0, 64 - side, 2))
        patch = np.zeros((side, side, 3), np.uint8)
        patch[:] = (220, 30, 30)
        patch[::6] = (255, 255, 255)
        image[top : top + side, left : left + side] = patch
        Image.fromarray(image).save(folder / f"concept-{i}.png")


DEMO_PROMPTS = (  # one prompt of each of the supplement's six kinds
    "a photo of {}",
    "{} on the beach",
    "a red {}",
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
        "instance_data_dir": "./benchmark_dataset/pet_striped",
        "prompt_filename": "prompts/dog.txt",
    }
    write_photos(root / "benchmark_dataset" / "pet_striped")
    (root / "dataset.json").write_text(json.dumps([entry], indent=2) + "\n")


def main(out: str) -> None:
    root = Path(out)
    if not (root / "tiny-base" / "model_index.json").exists():
        save_tiny_pipeline(root / "tiny-base")
    if not (root / "tiny-clip" / "config.json").exists():
        save_tiny_clip(root / "tiny-clip")
        save_tiny_dino(root / "tiny-dino")
    write_photos(root / "photos")
    write_dataset(root / "cc101", root / "photos")
    print(
        f"tiny random base, CLIP and DINO in {root}; photos in {root / 'photos'}; dataset in {root / 'cc101'}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
