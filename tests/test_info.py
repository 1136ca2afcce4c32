"""persres info: a residual file described from its safetensors header alone, without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import randomize_residuals, tiny_config

import persres
from persres import ResidualConfig, add_residuals, read_residual_file, save_residuals
from persres.config import TrainConfig
from persres.formats.info import describe
from persres.formats.io import family
from persres.testing.tiny import tiny_unet
from persres.training.train import run_metadata, train


def described_with_torch(path: Path) -> dict[str, Any]:
    """What ``persres info`` printed before it read headers only: computed from the loaded tensors."""
    loaded = read_residual_file(path)
    layers = [
        {"path": name, "m": int(a.shape[0]), "rank": int(a.shape[1]), "parameters": a.numel() + b.numel()}
        for name, (a, b) in loaded.layers().items()
    ]
    return {
        "file": str(loaded.path),
        "format_version": int(loaded.metadata["format_version"]),
        "base_model": loaded.metadata.get("base_model"),
        "architecture": family(loaded.metadata["architecture"])
        if "architecture" in loaded.metadata
        else None,
        "token": loaded.metadata.get("token"),
        "class_word": loaded.metadata.get("class_word"),
        "rank_config": loaded.json_field("rank_config"),
        "steps": int(loaded.metadata["step"]) if "step" in loaded.metadata else None,
        "persres_version": loaded.metadata.get("persres_version"),
        "layers": layers,
        "total_parameters": sum(layer["parameters"] for layer in layers),
    }


@pytest.fixture
def train_like_file(tmp_path: Path) -> Path:
    """A residual file with the metadata train writes, without training."""
    unet = tiny_unet()
    add_residuals(unet, ResidualConfig(rank=3))
    randomize_residuals(unet)
    config = TrainConfig(
        base="tiny/base", images="photos", class_word="dog", steps=40, residual=ResidualConfig(rank=3)
    )
    return save_residuals(unet, tmp_path / "residuals.safetensors", **run_metadata(config, 20))


def test_describe_equals_the_torch_computation(train_like_file: Path) -> None:
    info = describe(train_like_file)
    assert info == described_with_torch(train_like_file)
    assert (info["steps"], info["token"], info["rank_config"]) == (20, "sks", {"rank": 3, "init": "zero"})
    assert info["total_parameters"] == 2 * 3 * (32 + 64 + 32 + 32)  # down 0, mid, up 1 (two blocks)
    assert json.loads(json.dumps(info)) == info
    assert describe(train_like_file.parent) == info  # a run's folder means its residuals.safetensors


@pytest.mark.slow
def test_describe_a_trained_run_as_before(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    config = tiny_config(conv_base, photos, steps=2, batch_size=1, checkpoint_every=1, lr=1e-3)
    run = train(config, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001" / "residuals.safetensors"
    for path in (run.residuals, checkpoint):
        assert describe(path) == described_with_torch(path)
    assert describe(checkpoint)["steps"] == 1 and describe(run.residuals)["steps"] == 2


def test_describe_imports_no_torch(train_like_file: Path) -> None:
    code = (
        "import json, sys\n"
        "from persres.formats.info import describe\n"
        f"info = describe({str(train_like_file)!r})\n"
        "heavy = sorted({'torch', 'diffusers', 'transformers', 'safetensors'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "print(json.dumps(info))\n"
    )
    source = str(Path(persres.__file__).parents[1])  # this checkout's persres, first on the path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == described_with_torch(train_like_file)
