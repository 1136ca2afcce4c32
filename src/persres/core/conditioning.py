"""What the denoiser is conditioned on in training: asked of the pipeline's backbone.

Each family has its own conditioning object (``persres.backbones.Condition``): the U-Nets'
``Conditioning`` (text sequence; SDXL adds the pooled embedding and size ids, ``persres.backbones.unet``)
and Flux's ``FluxConditioning`` (T5 sequence, pooled CLIP embedding, text ids, ``persres.backbones.flux``).
``Conditioning`` is re-exported here for callers.
"""

from __future__ import annotations

from typing import Any

import torch

from persres.backbones import Condition, backbone_of
from persres.backbones.unet import Conditioning

__all__ = ["Condition", "Conditioning", "encode"]


def encode(pipe: Any, prompt: str, device: torch.device, resolution: int) -> Condition:
    """The prompt's conditioning, with gradients where the text side is trainable (no ``no_grad``)."""
    return backbone_of(pipe).encode(pipe, prompt, device, resolution)
