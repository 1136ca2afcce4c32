"""Shared fixtures: tiny random Stable Diffusion pipelines saved as diffusers folders, and photos."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail at once, never wait on the network

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import make_dataset
from PIL import Image

from persres.testing.tiny import (
    save_tiny_clip,
    save_tiny_dino,
    save_tiny_flux_pipeline,
    save_tiny_pipeline,
    save_tiny_sdxl_pipeline,
)


@pytest.fixture(scope="session")
def conv_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.x layout: 1x1 Conv2d proj_out."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-conv", linear_projection=False)


@pytest.fixture(scope="session")
def linear_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x layout: Linear proj_out."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-linear", linear_projection=True)


@pytest.fixture(scope="session")
def xl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stable Diffusion XL layout: two text encoders, text_time conditioning, 2-layer blocks."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("base") / "tiny-sdxl")


@pytest.fixture(scope="session")
def flux_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flux.1-dev layout: 2 double- and 2 single-stream blocks, CLIP + T5, 16-channel VAE, guidance."""
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("base") / "tiny-flux")


@pytest.fixture(params=["conv", "linear"])
def base(request: pytest.FixtureRequest, conv_base: Path, linear_base: Path) -> Path:
    return conv_base if request.param == "conv" else linear_base


@pytest.fixture
def unet(base: Path) -> torch.nn.Module:
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    return pipe.unet.eval()


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small photos of a 'concept': a coloured square on a plain background."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        array = np.full((20 + 4 * i, 24, 3), 40, np.uint8)
        array[4:14, 6:16] = rng.integers(0, 255, 3)
        Image.fromarray(array).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def scorer_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("scorers")
    return str(save_tiny_clip(root / "clip")), str(save_tiny_dino(root / "dino"))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A CustomConcept101-format dataset of two concepts (random 20 px photos, two prompts each)."""
    return make_dataset(tmp_path / "cc101")
