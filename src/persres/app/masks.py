"""LAG's masks drawn over the image: per U-Net resolution, at one denoising step.

A LAG sample records, per step, per attn2 block, a mask (1, G, HW) of where each concept's residual
applied (``Sample.masks``). Blocks of one resolution are averaged, the mean is stretched to the image
and tinted over it: where the residual changed the image, and where it left the base model alone.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from persres.inference.outputs import block_shape
from persres.inference.sampling import Sample

TINTS = ((255, 40, 40), (40, 120, 255))  # V1* red, V2* blue
ALPHA = 0.55  # the tint's strength where the mask is 1
MIN_SIDE = 256  # overlays are shown at least this large (toy-world images are 32 px)


def mask_steps(item: Sample) -> list[int]:
    return sorted(item.masks)


def resolutions(item: Sample) -> list[int]:
    """The blocks' position counts (h * w), finest first."""
    first = next(iter(item.masks.values()))
    return sorted({mask.shape[-1] for mask in first.values()}, reverse=True)


def mean_mask(item: Sample, step: int, size: int, group: int) -> np.ndarray:
    """(h, w) in [0, 1]: the mask of concept ``group`` averaged over the blocks with ``size`` positions."""
    masks = [m[0, group].float() for m in item.masks[step].values() if m.shape[-1] == size]
    return torch.stack(masks).mean(0).view(block_shape(size, item.latent_size)).numpy()  # (h, w)


def overlay(image: Image.Image, masks: list[np.ndarray]) -> Image.Image:
    """``image`` enlarged to at least MIN_SIDE, each concept's mask tinted over it (nearest: cells show)."""
    scale = max(1, -(-MIN_SIDE // min(image.size)))
    size = (image.width * scale, image.height * scale)
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    for group, mask in enumerate(masks):
        cells = Image.fromarray((mask * 255).astype(np.uint8), mode="L").resize(
            size, Image.Resampling.NEAREST
        )
        weight = np.asarray(cells, dtype=np.float32)[..., None] / 255.0 * ALPHA  # (H, W, 1)
        base = base * (1 - weight) + np.array(TINTS[group % len(TINTS)], dtype=np.float32) * weight
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8))


def overlays(item: Sample, step_index: int) -> list[tuple[Image.Image, str]]:
    """One overlay per resolution at the ``step_index``-th recorded step (clamped), with a caption."""
    if not item.masks:
        return []
    steps = mask_steps(item)
    step = steps[max(0, min(step_index, len(steps) - 1))]
    groups = next(iter(item.masks[step].values())).shape[1]
    shown = []
    for size in resolutions(item):
        h, w = block_shape(size, item.latent_size)
        masks = [mean_mask(item, step, size, g) for g in range(groups)]
        shown.append((overlay(item.image, masks), f"step {step + 1}/{len(steps)}: {h}x{w} blocks"))
    return shown
