"""The shipped toy-world models: they load like any checkpoint and the oracle reads real scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from persres.core.pipeline import load_pipeline
from persres.toyworld.experiment import ToySettings, personalize, reference_photos, sample_variants
from persres.toyworld.judge import load_judge, read_images
from persres.toyworld.prompts import concept_prompts
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


def test_shipped_vae_posterior_is_deterministic() -> None:
    # the base U-Net was trained on posterior means; a sampled latent must be the mean
    vae = StableDiffusionPipeline.from_pretrained(BASE).vae
    rng = np.random.default_rng(5)
    pixels = np.stack([render(random_scene(rng))[0] for _ in range(4)])
    x = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    assert posterior.std.max() < 1e-4 * posterior.mean.abs().mean()


@pytest.mark.slow
def test_short_personalization_raises_identity_over_the_base(tmp_path: Path) -> None:
    instance = HELD_OUT[0]
    settings = ToySettings(steps=50, lr=1e-2, images_per_prompt=8, sample_steps=10)
    photos = reference_photos(instance, tmp_path / "photos", seed=0)
    residuals = personalize(str(BASE), instance, photos, tmp_path / "run", settings).residuals
    prompt = concept_prompts(instance, per_kind=1)[0]  # "a photo of a V* dog"
    pipe = load_pipeline(str(BASE), torch.float32, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    variants = sample_variants(pipe, residuals, [prompt], settings.sampling())
    judge = load_judge(ORACLE)
    identity = {}
    for variant in ("base", "normal"):
        reads = read_images(judge, [np.asarray(s.image) for s in variants[variant]])
        identity[variant] = np.mean([check(r, prompt.expect)["identity"] for r in reads])
    assert identity["normal"] >= identity["base"] + 0.25, identity
