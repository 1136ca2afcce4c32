"""Uploaded photos: counted, size-checked and decoded as images before anything is kept.

Each upload is checked on its own and refused with its file name: too many bytes, too many pixels
(read from the header, before decoding: a 50-megapixel PNG of one colour is a few kilobytes but
150 MB decoded), or not an image at all. Kept photos are re-encoded as PNGs under names the app
chooses (``photo-00.png`` ...): the uploaded names are only ever shown, never used as paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from persres.errors import InputError
from persres.files import atomic_dir
from persres.images import bomb_pixels, load_rgb

MIN_PHOTOS, MAX_PHOTOS = 3, 15  # the paper's 3-15 photos of a concept
MAX_BYTES = 20 * 1024 * 1024  # per photo; gradio refuses larger uploads before they reach the app
MAX_PIXELS = 25_000_000  # per photo (a 24-megapixel camera); far below PIL's 89-megapixel bomb limit
MAX_SIDE = 1024  # kept photos are shrunk to this side: training crops to a few hundred pixels


def shown_name(path: str | os.PathLike[str]) -> str:
    return Path(path).name


def check_photo(path: Path) -> Image.Image:
    """The upload decoded as RGB, or an ``InputError`` naming it and saying what to do."""
    name = shown_name(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InputError(
            f"{name} is {size / 2**20:.1f} MB, above {MAX_BYTES // 2**20} MB; upload a smaller copy"
        )
    try:
        with Image.open(path) as header:  # reads the header only
            width, height = header.size
        pixels: int | None = width * height
    except Image.DecompressionBombError as exc:  # PIL refused it on its size, which only the message says
        pixels = bomb_pixels(exc)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"{name} is not an image (jpg, png or webp); remove it") from None
    if pixels is None or pixels > MAX_PIXELS:
        count = f"{pixels:,} pixels" if pixels is not None else "more pixels than PIL opens"
        raise InputError(
            f"{name} has {count}, above the app's limit of {MAX_PIXELS:,}; "
            "upload a smaller copy (a few megapixels are plenty)"
        )
    try:
        image = load_rgb(path)
    except InputError:
        raise InputError(f"{name} is not a readable image; remove or replace it") from None
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def keep_photos(uploads: Sequence[str | os.PathLike[str]], folder: Path) -> list[Path]:
    """Check every upload, then write them all to ``folder`` at once (nothing is kept if one is bad)."""
    if not MIN_PHOTOS <= len(uploads) <= MAX_PHOTOS:
        raise InputError(f"upload {MIN_PHOTOS}-{MAX_PHOTOS} photos of your concept, got {len(uploads)}")
    images = [check_photo(Path(upload)) for upload in uploads]
    with atomic_dir(folder, replace=True) as tmp:  # the run folder is new: stale photos are of a removed run
        for i, image in enumerate(images):
            image.save(tmp / f"photo-{i:02d}.png")
    return sorted(folder.glob("photo-*.png"))
