"""The shipped toy-world models: they load like any checkpoint and the oracle reads real scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline

from persres.toyworld.judge import load_judge, read_images
from persres.toyworld.scenes import random_scene, render

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "toyworld-base"
ORACLE = ROOT / "models" / "toyworld-oracle"


def test_shipped_base_is_small_safetensors_and_loads_with_plain_diffusers() -> None:
    files = [p for p in BASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    weights = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_judge_reads_real_scenes() -> None:
    judge = load_judge(ORACLE)
    rng = np.random.default_rng(123)
    scenes = [random_scene(rng) for _ in range(300)]
    reads = read_images(judge, [render(s)[0] for s in scenes])
    for name in ("cls", "background", "pattern"):
        accuracy = np.mean([r[name] == getattr(s, name) for r, s in zip(reads, scenes, strict=True)])
        assert accuracy >= 0.95, name
