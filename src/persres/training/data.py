"""Concept images: read a folder of 1-50 photos into tensors, and draw augmented training batches.

Images are opened by ``persres.images.load_rgb`` (any mode, EXIF orientation, bombs refused).
Augmentation (our choice, the paper is silent): a random
square crop covering at least ``min_crop`` of the shorter side, resized to the training
resolution, and a random horizontal flip, all drawn from one ``torch.Generator`` so a resumed
run draws the same batches. That is the paper's recipe; caption files beside the photos (`captions`,
``captions.py``) and aspect-ratio buckets instead of square crops (`buckets`, ``buckets.py``) are
options, put together with each image's prompt by ``batches.py``. With cached latents
(`cache_latents`, ``latent_cache.py``) each photo has one fixed crop, and ``choose`` makes a batch's draws
without cropping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from persres.errors import InputError
from persres.images import load_rgb
from persres.training.captions import check_pairs, is_caption
from persres.training.masks import mask_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGES = 50


def list_images(
    folder: str | os.PathLike[str], limit: int | None = MAX_IMAGES, captions: bool = False
) -> list[Path]:
    """The image files of ``folder``, sorted; hidden files and sub-folders are skipped.

    ``limit``: the most a folder may hold; None for persres' own folders of class images for prior
    preservation (``persres.training.prior``, 100-200 of them), never for the concept's photos.
    ``captions``: the folder may also hold a caption file beside each photo (``persres.training.captions``),
    never listed as a photo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"image folder {folder} not found; pass `images` with a folder of 1-{MAX_IMAGES} photos"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    texts = [p for p in files if is_caption(p)] if captions else []
    files = [p for p in files if p not in texts]
    strangers = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strangers:
        captions_there = any(is_caption(Path(name)) for name in strangers)
        hint = "; caption files beside the photos are read with `captions`" if captions_there else ""
        raise InputError(
            f"{folder} holds files that are not images: {strangers[:5]}; keep only "
            f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files there{hint}"
        )
    check_pairs(folder, files, texts)
    if not files:
        raise InputError(f"image folder {folder} is empty; put 1-{MAX_IMAGES} photos of the concept in it")
    if limit is not None and len(files) > limit:
        raise InputError(
            f"{folder} holds {len(files)} images; personalization takes 1-{MAX_IMAGES}, pick the best"
        )
    return files


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class ConceptImages:
    """The concept's photos, shorter side at the training resolution, ready to crop."""

    paths: list[Path]
    tensors: list[torch.Tensor]  # each (3, H, W), min(H, W) == resolution
    resolution: int
    masks: list[torch.Tensor] | None = None  # with a `mask` from files: each (1, H, W) in [0, 1] (masks.py)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike[str],
        resolution: int,
        limit: int | None = MAX_IMAGES,
        captions: bool = False,
    ) -> ConceptImages:
        return cls.from_paths(list_images(folder, limit, captions), resolution)

    @classmethod
    def from_paths(cls, paths: list[Path], resolution: int) -> ConceptImages:
        tensors = [to_tensor(resize_shorter_side(load_rgb(p), resolution)) for p in paths]
        return cls(paths, tensors, resolution)

    def with_masks(self, masks: list[Image.Image]) -> ConceptImages:
        """These photos with a mask each (``masks.read_masks``: the photo's upright size), resized as the
        photos are."""
        sizes = [(int(t.shape[2]), int(t.shape[1])) for t in self.tensors]  # (W, H)
        tensors = [mask_tensor(m, size) for m, size in zip(masks, sizes, strict=True)]
        return ConceptImages(self.paths, self.tensors, self.resolution, tensors)

    def batch(self, size: int, generator: torch.Generator, min_crop: float, flip: bool) -> torch.Tensor:
        """(size, 3, R, R): random images, each randomly cropped and flipped."""
        return self.draw(size, generator, min_crop, flip)[0]

    def draw(
        self, size: int, generator: torch.Generator, min_crop: float, flip: bool
    ) -> tuple[torch.Tensor, list[int]]:
        """``batch``'s images, and the photo each came from."""
        pixels, _, picks = self.draw_masked(size, generator, min_crop, flip)
        return pixels, picks

    def draw_masked(
        self, size: int, generator: torch.Generator, min_crop: float, flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """``draw``'s images, their masks (size, 1, R, R) cropped and flipped with the same draws (None
        without masks), and the photo each came from."""
        picks = draw_picks(len(self.tensors), size, generator)
        crops, masks = [], []
        for i in picks:
            draws = augment_draws(generator)
            crops.append(self.square(self.tensors[i], draws, min_crop, flip))
            if self.masks is not None:
                masks.append(self.square(self.masks[i], draws, min_crop, flip))
        return torch.stack(crops), torch.stack(masks) if masks else None, picks

    def choose(self, size: int, generator: torch.Generator, flip: bool) -> tuple[list[int], list[bool]]:
        """``draw``'s photos and whether each is flipped, from the very draws ``draw`` makes, without the
        images: the choice of a batch of fixed crops (cached latents, ``latent_cache.py``)."""
        picks = draw_picks(len(self.tensors), size, generator)
        return picks, [flipped(augment_draws(generator), flip) for _ in picks]

    def square(self, image: torch.Tensor, draws: Draws, min_crop: float, flip: bool) -> torch.Tensor:
        """(C, R, R): the square of ``image`` (C, H, W) that ``draws`` place, resized, maybe flipped (a photo,
        or its mask with the photo's draws)."""
        _, height, width = image.shape
        side = round(min(height, width) * (min_crop + (1.0 - min_crop) * draws[0]))
        top = int(draws[1] * (height - side + 1))
        left = int(draws[2] * (width - side + 1))
        crop = image[:, top : top + side, left : left + side]
        if side != self.resolution:
            crop = F.interpolate(
                crop[None],
                size=(self.resolution, self.resolution),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
        if flipped(draws, flip):
            crop = crop.flip(-1)
        return crop


Draws = list[float]  # one image's augmentation: crop size, top, left, flip; each in [0, 1)
CENTRED: Draws = [1.0, 0.5, 0.5, 1.0]  # the largest crop, centred, not flipped: a cached photo's


def augment_draws(generator: torch.Generator) -> Draws:
    """One image's four draws: always four, whatever the settings, so the stream stays aligned."""
    return torch.rand(4, generator=generator).tolist()


def flipped(draws: Draws, flip: bool) -> bool:
    """Whether an image with these ``draws`` is flipped, `flip` being on or off."""
    return flip and draws[3] < 0.5


def draw_picks(count: int, size: int, generator: torch.Generator) -> list[int]:
    """``size`` photos of ``count``, with replacement."""
    return torch.randint(count, (size,), generator=generator).tolist()
