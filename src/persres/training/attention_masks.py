"""`mask` attention: each step's loss mask from the frozen base's cross-attention map of the class word.

At each step the base denoiser (what the method trains switched off: residuals bypassed, LoRA adapters
disabled; the methods that train the denoiser's own weights or the text side have no separate base, so
theirs is the model as trained so far) runs once more on the step's noisy latents and conditioning,
under ``torch.no_grad`` (no gradient goes through it, and the mask is a constant of the loss), with
LAG's capture processors (``Backbone.capture_processor``, the ones localized sampling installs) on
the attention layers that LAG reads for every residual block (``Backbone.attention_layers`` of each
``residual_targets`` layer: every ``attn2`` of the U-Net's transformer blocks at every resolution, every
joint attention of Flux's double and single blocks). Each layer's map of the class word (head mean,
``lag.block_score``) is laid on its own grid (the U-Net's h/s x w/s at downsampling s, Flux's 2x2 latent
patches: s = 2), upsampled bilinearly to the latent grid (h, w), and the maps of all layers are summed:
every resolution's view of where the concept is counts, as the paper sums a block's tokens. The sum is
binarised by the paper's median rule (``lag.binarize``: 1 above the image's median), one mask per image.

The class word only, not V*: the base has not learned V*, whose map says nothing of the concept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from persres.backbones import Backbone, backbone_of
from persres.core.attention import swapped_processors
from persres.core.lag import binarize, block_score, requested_keys
from persres.core.pipeline import prompt_readers
from persres.core.residuals import residuals_disabled
from persres.errors import ConfigError
from persres.formats.concepts import word_spans


class AttentionMasks:
    """The step's masks (B, 1, h, w) of the text columns ``columns`` (1, 1, T), called as ``(noisy, steps,
    text)``; ``pipe`` is what ``backbone.predict`` takes with ``denoiser`` (unwrapped: the mask pass needs
    no distributed sync)."""

    def __init__(self, pipe: Any, denoiser: nn.Module, backbone: Backbone, columns: torch.Tensor) -> None:
        self.pipe, self.denoiser, self.backbone, self.columns = pipe, denoiser, backbone, columns
        self.layers = [
            layer
            for target in self.backbone.residual_targets(self.denoiser)
            for layer in self.backbone.attention_layers(self.denoiser, target)
        ]

    @classmethod
    def of(cls, pipe: Any, prompt: str, class_word: str) -> AttentionMasks:
        """The masks of ``class_word`` in the training ``prompt``, from ``pipe``'s denoiser."""
        backbone = backbone_of(pipe)
        return cls(pipe, backbone.denoiser(pipe), backbone, class_columns(pipe, prompt, class_word))

    def watching(self, noisy: torch.Tensor) -> contextlib.AbstractContextManager[object]:
        """Nothing to read from the training pass: the mask is the base's own pass (``__call__``)."""
        return contextlib.nullcontext()

    base: torch.Tensor | None = None  # the base's prediction of the last mask's pass

    def __call__(self, noisy: torch.Tensor, steps: torch.Tensor, text: Any) -> torch.Tensor:
        batch, _, height, width = noisy.shape
        with self.capturing(noisy) as total:
            self.base = frozen_prediction(self.pipe, self.denoiser, self.backbone, noisy, steps, text)
        return binarize(total.flatten(2), batch).view(batch, 1, height, width)

    def base_prediction(self) -> torch.Tensor | None:
        """The base's prediction made with the last mask (once: the next step makes its own)."""
        base, self.base = self.base, None
        return base

    @contextlib.contextmanager
    def capturing(self, noisy: torch.Tensor) -> Iterator[torch.Tensor]:
        """Inside the block, the denoiser's calls on latents shaped as ``noisy`` (B, C, h, w) add the class
        word's maps of every captured layer, on the latent grid, detached, to the yielded (B, 1, h, w)."""
        batch, _, height, width = noisy.shape
        columns = self.columns.to(noisy.device).expand(batch, -1, -1)  # (B, 1, T)
        total = torch.zeros(batch, 1, height, width, device=noisy.device)

        def hook(probs: torch.Tensor, keys: torch.Tensor | None = None) -> None:
            chosen = columns if keys is None else columns[..., keys.to(columns.device)]
            score = block_score(probs.detach(), chosen)  # (B, 1, HW) of the layer's grid
            total.add_(on_latent_grid(score, height, width))

        keys, length = requested_keys(self.columns), self.columns.shape[-1]
        processors = {layer: self.backbone.capture_processor(hook, keys, length) for layer in self.layers}
        with swapped_processors(self.denoiser, processors):
            yield total


class TrainedAttentionMasks(AttentionMasks):
    """`mask` attention-trained: the class word's maps captured in the step's own forward pass of the model
    being trained (detached, summed and binarised as ``AttentionMasks``): no second pass. ``watching``
    surrounds that pass; the mask is asked for after it."""

    captured: torch.Tensor | None = None

    @contextlib.contextmanager
    def watching(self, noisy: torch.Tensor) -> Iterator[object]:
        with self.capturing(noisy) as total:
            yield total
        self.captured = total

    def __call__(self, noisy: torch.Tensor, steps: torch.Tensor, text: Any) -> torch.Tensor:
        if self.captured is None:
            raise RuntimeError("`mask` attention-trained is read from a forward pass inside watching()")
        total, self.captured = self.captured, None
        batch, _, height, width = noisy.shape
        return binarize(total.flatten(2), batch).view(batch, 1, height, width)

    def base_prediction(self) -> torch.Tensor | None:
        return None  # the map came from the trained model's pass: the base has not run


def on_latent_grid(score: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, HW) over a grid downsampled s times from the latents' (h, w), row-major -> (B, 1, h, w),
    bilinearly upsampled (s from the count: HW = ceil(h/s) ceil(w/s))."""
    batch, _, count = score.shape
    scale = round(math.sqrt(height * width / count))
    rows, columns = -(-height // scale), -(-width // scale)
    if rows * columns != count:
        raise ValueError(f"an attention map of {count} positions does not tile latents of {height}x{width}")
    grid = score.view(batch, 1, rows, columns)  # (B, 1, h/s, w/s)
    if (rows, columns) == (height, width):
        return grid
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


def class_columns(pipe: Any, prompt: str, class_word: str) -> torch.Tensor:
    """(1, 1, T) 0/1: the class word's positions in ``prompt``, in every tokenizer that carries the prompt
    to the denoiser (a column of either counts, as ``sampling.prompt_columns`` joins SDXL's two)."""
    found = []
    for reader in prompt_readers(pipe):
        tokenizer = reader.tokenizer
        ids = tokenizer(prompt, padding="max_length", max_length=reader.limit, truncation=True).input_ids
        columns = torch.zeros(len(ids))
        for span in word_spans(tokenizer, ids, class_word):
            columns[list(span)] = 1.0
        found.append(columns)
    width = max(len(c) for c in found)
    joined = torch.stack([F.pad(c, (0, width - len(c))) for c in found]).amax(dim=0)
    if not joined.any():
        raise ConfigError(
            f"`mask` attention needs the class word {class_word!r} in the training prompt {prompt!r}; "
            "use a `class_word` the prompt names, or another `mask`"
        )
    return joined.view(1, 1, width)


def frozen_prediction(
    pipe: Any, denoiser: nn.Module, backbone: Backbone, noisy: torch.Tensor, steps: torch.Tensor, text: Any
) -> torch.Tensor:
    """The frozen base's prediction for ``noisy`` at ``steps`` under ``text``: no gradient, what is trained
    switched off (``base_only``)."""
    with torch.no_grad(), base_only(denoiser):
        return backbone.predict(pipe, denoiser, noisy.detach(), steps, text.detach())


@contextlib.contextmanager
def base_only(denoiser: nn.Module) -> Iterator[None]:
    """The frozen base inside the block: residuals bypassed, peft LoRA adapters disabled (diffusers'
    ``disable_adapters``/``enable_adapters``); both restored on exit, also on error."""
    adapters = bool(getattr(denoiser, "_hf_peft_config_loaded", False))
    with residuals_disabled(denoiser):
        if adapters:
            denoiser.disable_adapters()  # type: ignore[operator]
        try:
            yield
        finally:
            if adapters:
                denoiser.enable_adapters()  # type: ignore[operator]
