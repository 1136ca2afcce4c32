"""Helpers for tests on tiny U-Nets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from persres.residuals import find_residuals


def unet_inputs(
    unet: torch.nn.Module, batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([10, 500][:batch]), text


def randomize_residuals(unet: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Non-zero factors, so identity and merge checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in find_residuals(unet).values():
            wrapper.A.copy_(torch.randn(wrapper.A.shape, generator=g) * std)
            wrapper.B.copy_(torch.randn(wrapper.B.shape, generator=g) * std)


def run_unet(unet: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        latents, steps, text = inputs
        return unet(latents, steps, encoder_hidden_states=text).sample


def drop_model_max_length(tokenizer_folder: Path) -> Path:
    """Remove ``model_max_length`` from a saved tokenizer's config, as transformers 5 saves a
    CLIPProcessor: the tokenizer then reads it as 1e30."""
    path = tokenizer_folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    assert config.pop("model_max_length") is not None
    path.write_text(json.dumps(config))
    return tokenizer_folder
