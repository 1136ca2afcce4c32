"""Write losses.json: each step's loss of tiny training runs, made by persres before `mask` existed.

Run from a checkout of the commit before masked training (c96c916), CPU, one thread:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src:tests \
        python tests/data/mask-none-losses/make.py OUT.json
The bases and photos are rebuilt as tests/conftest.py builds them (fixed seeds); tests/test_masks.py runs
the same configs with `mask` none and asks for the very same losses.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from helpers import tiny_config
from PIL import Image

from persres.config import TrainConfig
from persres.testing.tiny import save_tiny_flux_pipeline, save_tiny_pipeline
from persres.training.train import train

CASES = {  # name -> (base, TrainConfig changes), as tests/test_masks.py's MASK_NONE_CASES
    "sd": ("conv", {}),
    "sd-lora": ("conv", {"method": "lora"}),
    "sd-buckets-cached": (
        "conv",
        {"resolution": 32, "buckets": True, "cache_latents": True, "min_crop": 1.0},
    ),
    "sd-dreambooth-prior": ("conv", {"method": "dreambooth", "prior_images": 2, "steps": 3, "lr": 1e-4}),
    "flux": ("flux", {"steps": 3}),
}


def photos(folder: Path) -> Path:
    """tests/conftest.py's ``photos``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        array = np.full((20 + 4 * i, 24, 3), 40, np.uint8)
        array[4:14, 6:16] = rng.integers(0, 255, 3)
        Image.fromarray(array).save(folder / f"photo{i}.png")
    return folder


def losses(config: TrainConfig, out: Path) -> list[float]:
    seen: list[float] = []
    train(config, out, progress=False, callback=lambda _, loss: seen.append(loss))
    return seen


def main(out: str) -> None:
    root = Path(tempfile.mkdtemp())
    bases = {
        "conv": save_tiny_pipeline(root / "tiny-conv", linear_projection=False),
        "flux": save_tiny_flux_pipeline(root / "tiny-flux"),
    }
    images = photos(root / "photos")
    found: dict[str, list[float]] = {}
    for name, (base, changes) in CASES.items():
        found[name] = losses(tiny_config(bases[base], images, **changes), root / name)
        print(name, found[name])
    Path(out).write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
