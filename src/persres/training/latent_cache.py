"""Cached latents (setting `cache_latents`, off by default), as kohya's and diffusers' training scripts'
``--cache_latents``: every photo is encoded by the VAE once, before the first step, and its posterior
(the VAE's mean and standard deviation) is kept; each step samples the kept posteriors instead of
encoding its batch. The VAE's encoder then runs once per photo instead of once per image per step.

A cached photo has one fixed crop: its centred square at the training resolution (``CENTRED``), or with
`buckets` its centred window at its bucket's size; so `cache_latents` takes `min_crop` 1 (``TrainConfig``
refuses a random crop size), and a photo that is not square loses its random crop position. With `flip`
the mirrored crop is encoded too (the VAE is not flip-equivariant: a mirrored latent is not the latent
of the mirrored photo).

Each step draws its photos and flips with the very draws the uncached path makes (``ConceptImages.choose``,
``Buckets.choose``: the four augmentation draws per image included) and samples the posteriors with the
backbone's ``latents``, as the uncached path samples a fresh encoding: on square photos a run with cached
latents gives the losses of one without.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from persres.backbones.vae import Posterior
from persres.training.buckets import Buckets, Size, window_at
from persres.training.data import CENTRED, ConceptImages


@dataclass(frozen=True)
class LatentCache:
    """Each photo's posterior (of its fixed crop) and, with ``flip``, its mirror's; each (1, C, h, w)."""

    images: ConceptImages  # the photos the batches are chosen from
    photos: list[Posterior]
    mirrors: list[Posterior] | None  # None without `flip`
    sizes: list[Size]  # each photo's crop, (H, W) pixels
    buckets: Buckets | None = None  # with `buckets`: a batch is of one bucket, as without the cache
    masks: list[torch.Tensor] | None = None  # with a `mask` from files: each photo's at its crop, (1, H, W)

    @classmethod
    def encode(
        cls,
        images: ConceptImages,
        posterior: Callable[[torch.Tensor], Posterior],
        flip: bool,
        buckets: Buckets | None = None,
    ) -> LatentCache:
        """The cache of ``images``: ``posterior`` (the backbone's VAE encoding of (1, 3, H, W) pixels) of
        each photo's fixed crop, and of its mirror with ``flip``; one photo at a time."""
        crops = [fixed_crop(images, index, buckets) for index in range(len(images.tensors))]
        photos = [posterior(crop[None]) for crop in crops]
        mirrors = [posterior(crop.flip(-1)[None]) for crop in crops] if flip else None
        sizes = [(int(crop.shape[1]), int(crop.shape[2])) for crop in crops]
        masks = None
        if images.masks is not None:  # cropped as their photos (a mirror's mask is the mask mirrored)
            masks = [fixed_crop(images, index, buckets, images.masks[index]) for index in range(len(crops))]
        return cls(images, photos, mirrors, sizes, buckets, masks)

    def draw(self, size: int, generator: torch.Generator) -> tuple[Posterior, list[int]]:
        """A batch of ``size`` posteriors, chosen as the uncached path chooses its images, and the photo
        each came from."""
        posterior, _, picks = self.draw_masked(size, generator)
        return posterior, picks

    def draw_masked(
        self, size: int, generator: torch.Generator
    ) -> tuple[Posterior, torch.Tensor | None, list[int]]:
        """``draw``, and the chosen crops' masks (size, 1, H, W), mirrored with their photo (None without)."""
        flip = self.mirrors is not None
        chooser = self.images if self.buckets is None else self.buckets
        picks, flips = chooser.choose(size, generator, flip)
        mirrors = self.mirrors or self.photos
        chosen = [(mirrors if f else self.photos)[i] for i, f in zip(picks, flips, strict=True)]
        masks = None
        if self.masks is not None:
            pairs = zip(picks, flips, strict=True)
            masks = torch.stack([self.masks[i].flip(-1) if f else self.masks[i] for i, f in pairs])
        return Posterior.cat(chosen), masks, picks


def fixed_crop(
    images: ConceptImages, index: int, buckets: Buckets | None, image: torch.Tensor | None = None
) -> torch.Tensor:
    """(3, H, W): photo ``index``'s centred square at the training resolution, or its centred window at
    its bucket's size; of ``image`` (its mask, (1, H, W)) instead of the photo where given."""
    image = images.tensors[index] if image is None else image
    if buckets is None:
        return images.square(image, CENTRED, 1.0, False)
    return window_at(image, buckets.of_photo[index], CENTRED, 1.0, False)
