"""What the denoiser is conditioned on in training: asked of the pipeline's backbone.

The U-Net family's ``Conditioning`` (text sequence; SDXL adds the pooled embedding and size ids) lives in
``persres.backbones.unet`` with the reasons for its values; it is re-exported here for callers.
"""

from __future__ import annotations

from typing import Any

import torch

from persres.backbones import backbone_of
from persres.backbones.unet import Conditioning

__all__ = ["Conditioning", "encode"]


def encode(pipe: Any, prompt: str, device: torch.device, resolution: int) -> Conditioning:
    """The prompt's conditioning, with gradients where the text side is trainable (no ``no_grad``)."""
    conditioning: Conditioning = backbone_of(pipe).encode(pipe, prompt, device, resolution)
    return conditioning
