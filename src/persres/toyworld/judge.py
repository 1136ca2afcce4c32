"""The judge: a small CNN that reads a toy image back into the generator's terms.

Six heads (object class, colour, pattern, background, style, second object) trained on fresh
generator scenes. It answers the direct questions of the quality benchmark: is the prompted
background there, the prompted class, the concept's colour and pattern? Colour is not asked of
sketches (they have none). Weights are safetensors with the label names in a JSON beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persres.files import atomic_path, write_json
from persres.toyworld.backgrounds import BACKGROUNDS
from persres.toyworld.scenes import CLASSES, COLOURS, PATTERNS, SECONDS, STYLES, Scene

HEADS: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "style": STYLES,
    "second": tuple(s or "none" for s in SECONDS),
}
IGNORE = -100


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.MaxPool2d(2),
    )


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_stage(3, 32), _stage(32, 64), _stage(64, 128), nn.Flatten())
        self.trunk = nn.Sequential(nn.Linear(128 * 4 * 4, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, 32, 32) in [-1, 1] -> logits per head."""
        hidden = self.trunk(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (32, 32, 3) images -> (B, 3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    out = {}
    for name, labels in HEADS.items():
        values = []
        for scene in scenes:
            value = getattr(scene, name) or "none"
            values.append(IGNORE if name == "colour" and scene.style == "sketch" else labels.index(value))
        out[name] = torch.tensor(values)
    return out


def save_judge(judge: Judge, folder: str | os.PathLike[str], accuracy: dict[str, float]) -> None:
    folder = Path(folder)
    with atomic_path(folder / "judge.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp)
    write_json(folder / "judge.json", {"heads": HEADS, "accuracy_on_generator_images": accuracy})


def load_judge(folder: str | os.PathLike[str]) -> Judge:
    folder = Path(folder)
    meta = json.loads((folder / "judge.json").read_text())
    if {k: tuple(v) for k, v in meta["heads"].items()} != HEADS:
        raise ValueError(f"{folder}/judge.json was trained for other labels; retrain the oracle")
    judge = Judge()
    judge.load_state_dict(load_file(folder / "judge.safetensors"))
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def read_images(judge: Judge, images: list[np.ndarray], batch: int = 256) -> list[dict[str, str]]:
    """Each image's most likely label per head."""
    out: list[dict[str, str]] = []
    for start in range(0, len(images), batch):
        logits = judge(to_tensor(images[start : start + batch]))
        picks = {name: value.argmax(-1).tolist() for name, value in logits.items()}
        for i in range(len(picks["cls"])):
            out.append({name: HEADS[name][picks[name][i]] for name in HEADS})
    return out
