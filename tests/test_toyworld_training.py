"""Training the toy base model: a stopped and resumed run is the same run, and the export loads
with plain diffusers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from persres.toyworld.train_base import BaseTrainConfig, train_unet, train_vae

TINY = BaseTrainConfig(vae_steps=2, vae_batch=2, unet_steps=4, batch=2, checkpoint_every=2, warmup=2)


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_resumed_base_training_equals_uninterrupted(tmp_path: Path) -> None:
    vae = train_vae(TINY, tmp_path / "a")
    train_unet(TINY, tmp_path / "a", vae, tmp_path / "a-out")

    vae_b = train_vae(TINY, tmp_path / "b")
    train_unet(replace(TINY, unet_steps=2), tmp_path / "b", vae_b, tmp_path / "b-stopped")
    train_unet(TINY, tmp_path / "b", vae_b, tmp_path / "b-out")  # resumes at step 2

    full, resumed, stopped = (
        _unet(tmp_path / "a-out"),
        _unet(tmp_path / "b-out"),
        _unet(tmp_path / "b-stopped"),
    )
    assert any(not torch.equal(full[k], stopped[k]) for k in full)  # the last two steps did something
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)


def test_exported_model_loads_and_samples_with_plain_diffusers(tmp_path: Path) -> None:
    vae = train_vae(replace(TINY, vae_steps=1), tmp_path / "w")
    train_unet(replace(TINY, unet_steps=1), tmp_path / "w", vae, tmp_path / "out")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    image = pipe("a photo of a dog on the beach", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert pipe.vae.config.scaling_factor > 0 and pipe.scheduler.config.clip_sample is False
