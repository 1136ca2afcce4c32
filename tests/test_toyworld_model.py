"""The shipped toy-world models: they load like any checkpoint, the oracle reads real scenes, and a
short personalization teaches the base model a held-out concept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from persres.pipeline import load_pipeline
from persres.toyworld.experiment import (
    ToySettings,
    base_samples,
    personalize,
    reference_photos,
    sample_variants,
)
from persres.toyworld.judge import load_judge, read_images
from persres.toyworld.prompts import ToyPrompt, concept_prompts
from persres.toyworld.quality import check
from persres.toyworld.scenes import HELD_OUT, random_scene, render

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


def _identity(pipe: StableDiffusionPipeline, samples: list, prompts: list[ToyPrompt], per: int) -> float:
    judge = load_judge(ORACLE)
    reads = read_images(judge, [np.asarray(s.image) for s in samples])
    expects = [p.expect for p in prompts for _ in range(per)]
    return float(np.mean([check(r, e)["identity"] for r, e in zip(reads, expects, strict=True)]))


@pytest.mark.parametrize("index", [0])
def test_short_personalization_raises_identity_over_base(tmp_path: Path, index: int) -> None:
    instance = HELD_OUT[index]
    settings = ToySettings(steps=60, images_per_prompt=6, sample_steps=15)
    photos = reference_photos(instance, tmp_path / "photos")
    residuals = personalize(str(BASE), instance, photos, tmp_path / "run", settings)
    prompts = [p for p in concept_prompts(instance) if p.category in ("identity", "change_background")]
    pipe = load_pipeline(str(BASE), torch.float32, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    variants = sample_variants(pipe, residuals, prompts, settings.sampling())
    base = _identity(pipe, variants["base"], prompts, settings.images_per_prompt)
    personalized = _identity(pipe, variants["normal"], prompts, settings.images_per_prompt)
    assert personalized >= base + 0.25, (base, personalized)
    again = base_samples(pipe, prompts[:1], settings.sampling())  # residuals removed: the base is back
    assert np.array_equal(np.asarray(again[0].image), np.asarray(variants["base"][0].image))
