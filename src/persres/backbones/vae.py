"""The VAE step every family shares: a batch of images encoded to the VAE's posterior (a diagonal
Gaussian), and a sample of it. Training encodes each batch and samples it at once, or, with
`cache_latents`, encodes every photo once before the first step and samples the kept posteriors each
step: both go through ``Posterior.sample``, so the two draw the same noise from the run's generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Posterior:
    """The VAE's latent distribution of a batch of images, unscaled: mean and standard deviation, each
    (N, C, h, w), on the device the VAE ran on."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """mean + std x eps (N, C, h, w); eps is drawn on the CPU from ``generator``, so a run draws the
        same on every device."""
        eps = torch.randn(self.mean.shape, generator=generator).to(self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    @staticmethod
    def cat(parts: Sequence[Posterior]) -> Posterior:
        """One batch of the ``parts``' images, in order (all of one latent size)."""
        return Posterior(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


@torch.no_grad()
def encode_posterior(vae: Any, pixels: torch.Tensor, device: torch.device) -> Posterior:
    """``vae``'s posterior of ``pixels`` (N, 3, H, W) on ``device``: (N, C, h, w) each."""
    posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return Posterior(posterior.mean, posterior.std)
