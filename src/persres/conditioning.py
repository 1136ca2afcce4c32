"""What the U-Net is conditioned on in training: a prompt's text encoding, and for SDXL also the pooled
embedding and the size/crop ids (``add_time_ids``).

SD 1.x/2.x: ``encoder_hidden_states`` (1, T, D) from one text encoder. SDXL: the two encoders' hidden
states side by side (1, T, D1 + D2), the second encoder's pooled projection (1, P) as ``text_embeds``
and six ``time_ids`` (original height and width, crop top and left, target height and width). Training
images here are random square crops resized to the training resolution R, so the ids are
(R, R, 0, 0, R, R): what diffusers' SDXL DreamBooth script computes for photos already at R with a
centre crop. Sampling goes through the diffusers pipeline, which builds the same ids itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from persres.pipeline import is_xl


@dataclass(frozen=True)
class Conditioning:
    hidden: torch.Tensor  # (1, T, D)
    pooled: torch.Tensor | None = None  # SDXL: (1, P)
    time_ids: torch.Tensor | None = None  # SDXL: (1, 6)

    def detach(self) -> Conditioning:
        return Conditioning(
            self.hidden.detach(),
            None if self.pooled is None else self.pooled.detach(),
            None if self.time_ids is None else self.time_ids.detach(),
        )

    def unet_kwargs(self, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the U-Net call for a batch of ``batch`` images."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden.expand(batch, -1, -1).to(dtype)}
        if self.pooled is not None and self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.expand(batch, -1).to(dtype),
                "time_ids": self.time_ids.expand(batch, -1).to(dtype),
            }
        return kwargs


def encode(pipe: Any, prompt: str, device: torch.device, resolution: int) -> Conditioning:
    """The prompt's conditioning, with gradients where the text side is trainable (no ``no_grad``)."""
    if not is_xl(pipe):
        return Conditioning(pipe.encode_prompt(prompt, device, 1, False)[0])
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    size = (resolution, resolution)
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=hidden.dtype, device=device)
    return Conditioning(hidden, pooled, time_ids)
