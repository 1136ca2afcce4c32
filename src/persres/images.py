"""Opening any image file as 8-bit RGB, safely: PIL and numpy only (no torch), so that commands which
only read images (``persres report``'s thumbnails) start at once.

Any PIL mode is accepted (grayscale, RGBA, palette, 16-bit); EXIF orientation is honoured;
transparency is composited on white; decompression bombs are refused.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from persres.errors import InputError


def load_rgb(path: Path) -> Image.Image:
    """Open any image as 8-bit RGB, upright per its EXIF orientation.

    An image above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is refused: PIL only
    warns between one and two times the limit, and a few such files would exhaust the memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(too_large(path, exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is not a readable image ({exc}); remove or replace it") from None
    return to_rgb(image)


def too_large(path: Path, exc: Exception) -> str:
    pixels = bomb_pixels(exc)
    size = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return (
        f"{path} has {size}, above the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} "
        "pixels (PIL's Image.MAX_IMAGE_PIXELS); shrink it (a few megapixels are plenty) or remove it"
    )


def bomb_pixels(exc: Exception) -> int | None:
    """The pixel count (width x height, from the header) of an image PIL refused as a decompression bomb:
    its message is the only place it is (``Image.open`` refuses before ``.size`` can be read)."""
    found = re.search(r"\((\d{1,18}) pixels\)", str(exc))  # PIL: "Image size (N pixels) exceeds limit ..."
    return int(found.group(1)) if found else None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") else max(float(array.max()), 1e-8)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")
