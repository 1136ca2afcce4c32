"""Masked training (setting `mask`, "none" by default: the paper's plain MSE): the denoising loss weighted
inside and outside the concept, so that the photos' backgrounds are learned less or not at all.

Where the masks come from:
- "alpha": each photo's alpha channel, kohya sd-scripts' ``--alpha_mask`` convention (opaque = subject);
  a photo without one, or whose alpha is opaque everywhere (it marks no background: most likely photos
  that were never cut out), is refused;
- a folder: one mask image per photo, matched by file stem (photo ``dog1.jpg`` <-> ``DIR/dog1.png``), of
  the photo's size; white = subject, grey values are partial weights (kohya's ``--masked_loss``);
- "attention": at each step, the frozen base's cross-attention map of the class word for the step's noisy
  latents, from a second, no_grad pass (``attention_masks.py``);
- "attention-trained": the same map read from the model being trained, in the step's own forward pass
  (detached): no second pass, but the map of the personalized model, as LAG reads it when sampling.

A mask from a file is read at the photo's upright size (EXIF orientation, as the photo), resized with the
photo to the training resolution, and cropped and flipped with the very draws of its photo
(``ConceptImages``, ``Buckets``, ``LatentCache``): the random stream is the one a run without masks
draws. It reaches the latent grid by area averaging (each latent cell's weight is the share of its
pixels on the subject), as kohya's masked loss does (``F.interpolate(mode="area")``): soft weights keep a
thin part of the subject that covers a fraction of a cell instead of a threshold dropping it.

The loss: weights w = mask + `mask_background_weight` (1 - mask) per latent position (the same for every
channel), the MSE weighted and normalised by the mean weight, sum(w e) / sum(w): an all-ones mask gives
exactly the plain MSE, and the loss keeps its scale whatever the subject's size. The default background
weight is 0, kohya's masked loss: the background is not learned at all (the base draws it); a small
weight (0.1) keeps some of it, e.g. to learn a concept's usual surroundings. The prior-preservation loss
(DreamBooth) stays unmasked.

`mask_background_target` base (residuals and LoRA, whose training can be switched off): outside the mask
the prediction is compared with the frozen base's own prediction for the same noisy latents and prompt
(no gradient through it) instead of the photo's target: sum(m e_photo + b (1 - m) e_base) / sum(w), so
the background is neither learned from the photos nor left free, but held where the base puts it. The
base's prediction is the `attention` mask's own pass where that mask is used, else a second pass.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from persres.errors import InputError
from persres.images import load_rgb

NONE, ALPHA, ATTENTION, ATTENTION_TRAINED = "none", "alpha", "attention", "attention-trained"
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class LatentMask(Protocol):
    """A step's loss mask: ``watching`` is entered around the step's forward pass (a mask read from that
    very pass), then the mask is asked for: (noisy latents, timesteps, conditioning) -> (B, 1, h, w) in
    [0, 1] at the latent grid."""

    def watching(self, noisy: torch.Tensor) -> AbstractContextManager[object]: ...

    def __call__(self, noisy: torch.Tensor, steps: torch.Tensor, text: Any) -> torch.Tensor: ...

    def base_prediction(self) -> torch.Tensor | None:
        """The frozen base's prediction made for the last mask (`mask` attention's pass), else None."""
        ...


def from_files(mask: str) -> bool:
    """Whether `mask` is read from files (alpha channels or a folder), before training."""
    return mask not in (NONE, ATTENTION, ATTENTION_TRAINED)


def read_masks(mask: str, photos: list[Path]) -> list[Image.Image]:
    """Each photo's mask as an 8-bit grayscale image (255 = subject) at the photo's upright size; every
    file checked before anything is trained or written."""
    if mask == ALPHA:
        return [alpha_mask(photo) for photo in photos]
    folder = Path(mask)
    if not folder.is_dir():
        raise InputError(
            f"mask folder {folder} not found; pass `mask` with a folder holding one mask per photo (the "
            "photo's name with an image suffix, white = subject), or alpha, attention or none"
        )
    return [folder_mask(folder, photo) for photo in photos]


def folder_mask(folder: Path, photo: Path) -> Image.Image:
    """``photo``'s mask in ``folder``: the one image file of the photo's stem, the photo's size, not empty."""
    found = sorted(p for p in folder.iterdir() if p.stem == photo.stem and p.suffix.lower() in MASK_SUFFIXES)
    if not found:
        raise InputError(
            f"no mask for photo {photo.name} in {folder}; add {folder / (photo.stem + '.png')} (white = "
            "subject, black = background, the photo's size)"
        )
    if len(found) > 1:
        raise InputError(
            f"photo {photo.name} has {len(found)} masks in {folder} ({', '.join(p.name for p in found)}); "
            "keep one"
        )
    path = found[0]
    image = opened(path).convert("L")
    size = load_rgb(photo).size
    if image.size != size:
        raise InputError(
            f"mask {path} is {image.size[0]}x{image.size[1]} but its photo {photo.name} is "
            f"{size[0]}x{size[1]}; make the mask at the photo's size"
        )
    if not np.asarray(image).any():
        raise InputError(
            f"mask {path} is black everywhere (no subject); paint the subject white, or remove the photo"
        )
    return image


def alpha_mask(photo: Path) -> Image.Image:
    """``photo``'s alpha channel (opaque = subject); refused where it has none or it is opaque everywhere."""
    image = opened(photo)
    if not has_alpha(image):
        raise InputError(
            f"photo {photo} has no alpha channel for `mask` alpha; save it as a PNG or WebP with the "
            "background transparent, or give a folder of masks as `mask`"
        )
    alpha = image.convert("RGBA").getchannel("A")
    values = np.asarray(alpha)
    if not values.any():
        raise InputError(f"photo {photo} is transparent everywhere (no subject); remove it or fix its alpha")
    if values.min() == 255:
        raise InputError(
            f"photo {photo} has an alpha channel that is opaque everywhere: it marks no background; make "
            "the background transparent, or give a folder of masks, or `mask` none"
        )
    return alpha


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def opened(path: Path) -> Image.Image:
    """``path`` loaded and upright per its EXIF orientation (as ``load_rgb`` turns the photos)."""
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError,
            SyntaxError, ValueError) as exc:  # fmt: skip
        raise InputError(f"{path} is not a readable image ({exc}); remove or replace it") from None
    if upright.width == 0 or upright.height == 0:
        raise InputError(f"{path} is empty (0 pixels); remove or replace it")
    return upright


def mask_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) in [0, 1]: ``mask`` resized to ``size`` (W, H), as its photo is (bicubic)."""
    resized = mask if mask.size == size else mask.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None]


def to_latent_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks -> (B, 1, h, w): each latent cell's share of subject (area average)."""
    return F.interpolate(masks, size=grid, mode="area")


class FileMask:
    """A batch's pixel masks (B, 1, H, W) as the loss's latent mask: area averages over the latent grid."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks

    def watching(self, noisy: torch.Tensor) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def __call__(self, noisy: torch.Tensor, steps: torch.Tensor, text: Any) -> torch.Tensor:
        return to_latent_grid(self.masks.to(noisy.device), (noisy.shape[-2], noisy.shape[-1]))

    def base_prediction(self) -> torch.Tensor | None:
        return None


def file_mask(masks: torch.Tensor) -> LatentMask:
    return FileMask(masks)


def loss_weights(mask: torch.Tensor, background: float) -> torch.Tensor:
    """w = mask + background (1 - mask): 1 on the subject, ``background`` elsewhere."""
    return mask + background * (1.0 - mask)


def weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    per_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w e) / sum(w) over (B, C, h, w), ``weights`` (B, 1, h, w) shared by the channels: with all
    weights 1, exactly ``F.mse_loss`` (the mean of the squared error, divided by 1). ``per_image`` (B,)
    (`timestep_weighting`) scales each image's share: sum(t w e) / sum(w)."""
    error = (prediction.float() - target.float()).square()  # (B, C, h, w)
    weights = weights.to(error)
    weighted = error * weights
    if per_image is not None:
        weighted = weighted * per_image.to(error).view(-1, 1, 1, 1)
    return weighted.mean() / weights.mean().clamp_min(1e-12)


def anchored_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    base: torch.Tensor,
    mask: torch.Tensor,
    background: float,
    per_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mask_background_target` base: sum(m e_target + b (1 - m) e_base) / sum(w) over (B, C, h, w),
    e_target = (prediction - target)^2, e_base = (prediction - base)^2, ``mask`` m (B, 1, h, w), b
    ``background``, w = ``loss_weights``; with ``base`` = ``target``, ``weighted_mse``'s loss."""
    predicted = prediction.float()
    mask = mask.to(predicted)
    error = mask * (predicted - target.float()).square()
    error = error + background * (1.0 - mask) * (predicted - base.float()).square()
    if per_image is not None:
        error = error * per_image.to(error).view(-1, 1, 1, 1)
    return error.mean() / loss_weights(mask, background).mean().clamp_min(1e-12)
