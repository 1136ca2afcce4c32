"""Writing sampled images: PNG + JSON sidecar per image, side-by-side grids, LAG mask strips.

Names are ``NNNN-prompt-SAMPLER.png``; numbering continues after every numbered file ``out`` already
holds, and all names are checked before the first file is written, so nothing is ever overwritten and
a refusal writes nothing. With ``--sampler both`` a normal and a LAG image share a number and a
``-both.png`` grid shows them side by side. ``-masks.png`` strips show where LAG applied the
residual: one row per U-Net resolution (blocks of one resolution averaged), one column per step.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from persres.errors import OutputExistsError
from persres.files import atomic_path, write_json
from persres.inference.sampling import Sample, SampleSettings

CELL = 48  # mask strip cell height in px
GAP = 2


def next_free_index(out: Path) -> int:
    """Numbering continues after every numbered file in ``out`` (a stray sidecar without its PNG too):
    nothing is overwritten."""
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    return max(taken, default=-1) + 1


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path, overwrite=False) as tmp:
        image.save(tmp, format="PNG")
    return path


def write_samples(
    out: str | os.PathLike[str], samples: list[Sample], settings: SampleSettings, extra: dict[str, Any]
) -> list[Path]:
    """Write every sample (and grids and mask strips); returns the paths of the sampled PNGs.

    Every name is chosen and checked to be free before the first file is written, so a refusal
    leaves ``out`` as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; samples are written into a folder, choose another `out`")
    planned, images = plan_files(out, samples, settings, extra)
    taken = [path for path in planned if path.exists() or path.is_symlink()]
    if taken:
        raise OutputExistsError(
            f"{taken[0]} already exists ({len(taken)} of the {len(planned)} files to write do); nothing "
            "was written: remove them or choose another `out`"
        )
    out.mkdir(parents=True, exist_ok=True)
    for path, content in planned.items():
        if isinstance(content, Image.Image):
            save_png(content, path)
        else:
            write_json(path, content, overwrite=False)
    return images


def stems(out: Path, samples: list[Sample]) -> list[tuple[str, Sample]]:
    """The file stem of each sample: a normal and a LAG image of one prompt and seed share a number."""
    index = (next_free_index(out) if out.is_dir() else 0) - 1
    named: list[tuple[str, Sample]] = []
    previous: Sample | None = None
    for item in samples:
        index += 0 if paired(previous, item) else 1
        named.append((f"{index:04d}-{slug(item.prompt)}", item))
        previous = item
    return named


def paired(previous: Sample | None, item: Sample) -> bool:
    return (
        previous is not None
        and item.sampler == "lag"
        and previous.sampler == "normal"
        and (previous.prompt, previous.seed) == (item.prompt, item.seed)
    )


def plan_files(
    out: Path, samples: list[Sample], settings: SampleSettings, extra: dict[str, Any]
) -> tuple[dict[Path, Image.Image | dict[str, Any]], list[Path]]:
    """Every file to write, in order (per sample its PNG, its JSON sidecar, a side-by-side grid with
    the normal image before it, and its mask strips), and the samples' PNG paths."""
    planned: dict[Path, Image.Image | dict[str, Any]] = {}
    images: list[Path] = []
    previous: Sample | None = None
    for stem, item in stems(out, samples):
        path = out / f"{stem}-{item.sampler}.png"
        sidecar = {"prompt": item.prompt, "expanded_prompt": item.expanded, **asdict(settings), **extra}
        if item.guidance is not None:  # the base's default, where the settings left it open
            sidecar["guidance"] = item.guidance
        sidecar.update(
            seed=item.seed,
            num_images=1,
            image=path.name,
            sampler=item.sampler,
            height=item.image.height,
            width=item.image.width,
        )
        planned[path] = item.image
        images.append(path)
        planned[path.with_suffix(".json")] = sidecar
        if previous is not None and paired(previous, item):
            planned[out / f"{stem}-both.png"] = side_by_side([previous.image, item.image])
        for name, strip_image in mask_strips(item).items():
            planned[out / f"{stem}-{item.sampler}-{name}.png"] = strip_image
        previous = item
    return planned, images


def side_by_side(images: list[Image.Image]) -> Image.Image:
    width = sum(image.width for image in images) + GAP * (len(images) - 1)
    grid = Image.new("RGB", (width, max(image.height for image in images)), (255, 255, 255))
    left = 0
    for image in images:
        grid.paste(image, (left, 0))
        left += image.width + GAP
    return grid


def mask_strips(item: Sample) -> dict[str, Image.Image]:
    """One strip per concept: ``masks`` (one concept) or ``masks-V1``, ``masks-V2``, ..."""
    if not item.masks:
        return {}
    first = next(iter(item.masks.values()))
    groups = next(iter(first.values())).shape[1]  # records are (N=1, groups, HW)
    names = ["masks"] if groups == 1 else [f"masks-V{g + 1}" for g in range(groups)]
    return {name: strip(item.masks, g, item.latent_size) for g, name in enumerate(names)}


def block_shape(positions: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a U-Net block with ``positions`` = h * w, from the latent size: each down block
    halves both sides, rounding up (stride-2 convolutions with padding 1)."""
    height, width = latent
    while height * width > positions:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != positions:
        raise ValueError(f"no U-Net resolution of latents {latent} has {positions} positions")
    return height, width


def strip(records: dict[int, dict[str, torch.Tensor]], group: int, latent: tuple[int, int]) -> Image.Image:
    """Rows: resolutions, finest first; columns: steps. White = residual applied."""
    steps = sorted(records)
    sizes = sorted({mask.shape[-1] for block in records.values() for mask in block.values()}, reverse=True)
    cell_w = max(1, round(CELL * latent[1] / latent[0]))
    canvas = Image.new("L", (GAP + len(steps) * (cell_w + GAP), GAP + len(sizes) * (CELL + GAP)), 96)
    for column, step in enumerate(steps):
        for row, size in enumerate(sizes):
            masks = [m[0, group] for m in records[step].values() if m.shape[-1] == size]
            mean = (
                torch.stack(masks).mean(0).view(block_shape(size, latent))
            )  # (h, w) at the block's resolution
            cell = Image.fromarray((mean.numpy() * 255).astype(np.uint8), mode="L")
            canvas.paste(
                cell.resize((cell_w, CELL), Image.Resampling.NEAREST),
                (GAP + column * (cell_w + GAP), GAP + row * (CELL + GAP)),
            )
    return canvas
