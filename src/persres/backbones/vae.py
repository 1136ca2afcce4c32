"""The VAE step every family shares: a sample of the posterior of a batch of images."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def posterior_sample(
    vae: Any, pixels: torch.Tensor, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """A sample of ``vae``'s posterior of ``pixels`` (N, 3, H, W) on ``device``, unscaled: (N, C, h, w).
    The noise is drawn on the CPU from ``generator``, so a run draws the same on every device."""
    posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
    return posterior.mean + posterior.std * eps
