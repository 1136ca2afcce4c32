"""Set up the no-weights demo: a tiny random Stable Diffusion folder and five photos of a 'concept'.

The base model has never been trained, so everything it draws is noise: the demo shows the whole
flow (train -> sample -> info -> merge) on a CPU in seconds, not image quality.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from persres.tiny import save_tiny_pipeline


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


def main(out: str) -> None:
    root = Path(out)
    if not (root / "tiny-base" / "model_index.json").exists():
        save_tiny_pipeline(root / "tiny-base")
    write_photos(root / "photos")
    print(f"tiny random base in {root / 'tiny-base'}, photos in {root / 'photos'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
