"""Training batches with their prompts, for the runs that use `captions` or `buckets` (both off by
default: the loop then draws ``ConceptImages.batch`` with the method's one prompt, as the paper does).

``TrainingData.draw`` gives the images and each image's prompt: its caption (``captions``), else the
method's prompt. ``batch_conditioning`` makes one conditioning of the batch from each distinct prompt's
(encoded once, or every step when the method trains the text side), joined by the base's backbone,
which also conditions on the batch's size where its family does (SDXL's size ids). With
`cache_latents` a batch is of the photos' cached posteriors (``latent_cache.py``), chosen alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from persres.backbones import Backbone
from persres.backbones.vae import Posterior
from persres.training.buckets import Buckets, Size
from persres.training.data import ConceptImages
from persres.training.latent_cache import LatentCache


@dataclass(frozen=True)
class Drawn:
    pixels: torch.Tensor | Posterior  # (B, 3, H, W), one size; with `cache_latents`, their posteriors
    prompts: tuple[str, ...]  # each image's
    cached_size: Size | None = None  # with `cache_latents`: the images' (H, W) pixels
    masks: torch.Tensor | None = None  # with a `mask` from files: (B, 1, H, W), cropped with the images

    @property
    def size(self) -> Size:
        """The batch's (H, W) pixels."""
        if self.cached_size is not None:
            return self.cached_size
        assert isinstance(self.pixels, torch.Tensor)  # a posterior comes with its size
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])


@dataclass(frozen=True)
class TrainingData:
    """The photos, each photo's prompt, and (with ``buckets``) each photo's bucket."""

    images: ConceptImages
    prompts: tuple[str, ...]  # per photo
    buckets: Buckets | None = None  # None: square crops at the training resolution

    @classmethod
    def of(
        cls, images: ConceptImages, prompt: str, captions: list[str | None] | None, step: int | None
    ) -> TrainingData:
        """``captions``: per photo (None where it has none), or None without `captions`; ``step``: the
        bucket sides' multiple, or None without `buckets`."""
        prompts = tuple(prompt if c is None else c for c in captions or [None] * len(images.paths))
        buckets = None
        if step is not None:
            shapes = [(int(t.shape[1]), int(t.shape[2])) for t in images.tensors]
            buckets = Buckets.assign(shapes, images.resolution, step)
        return cls(images, prompts, buckets)

    def draw(
        self,
        size: int,
        generator: torch.Generator,
        min_crop: float,
        flip: bool,
        cache: LatentCache | None = None,
    ) -> Drawn:
        """A batch and its prompts; with ``cache`` (`cache_latents`, built from these photos and buckets
        with `flip`) the cached posteriors, chosen with the same draws."""
        if cache is not None:
            posterior, masks, picks = cache.draw_masked(size, generator)
            return Drawn(posterior, tuple(self.prompts[i] for i in picks), cache.sizes[picks[0]], masks)
        if self.buckets is None:
            pixels, masks, picks = self.images.draw_masked(size, generator, min_crop, flip)
        else:
            tensors = self.images.tensors
            pixels, masks, picks = self.buckets.batch_masked(
                tensors, self.images.masks, size, generator, min_crop, flip
            )
        return Drawn(pixels, tuple(self.prompts[i] for i in picks), None, masks)


def batch_conditioning(drawn: Drawn, encoded: Callable[[str], Any], backbone: Backbone) -> Any:
    """The batch's conditioning: each image's prompt's (``encoded``, asked once per distinct prompt),
    joined by the backbone for the batch's (H, W)."""
    once = {prompt: encoded(prompt) for prompt in dict.fromkeys(drawn.prompts)}
    return backbone.join_conditioning([once[p] for p in drawn.prompts], drawn.size)
