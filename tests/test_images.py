"""Opening any image as 8-bit RGB: modes, EXIF orientation, damaged files and decompression bombs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persres.errors import InputError
from persres.images import load_rgb
from persres.training.data import ConceptImages


def test_modes_become_rgb_with_the_right_colours(tmp_path: Path) -> None:
    Image.new("L", (6, 4), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (6, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    palette = Image.new("P", (6, 4), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.full((4, 6), 65535, np.uint16)).save(tmp_path / "deep.png")  # 16-bit white
    Image.new("RGB", (6, 4), (10, 200, 30)).save(tmp_path / "photo.webp", lossless=True)
    expected = {
        "gray.png": (128, 128, 128),
        "clear.png": (255, 255, 255),
        "palette.png": (0, 0, 255),
        "deep.png": (255, 255, 255),
        "photo.webp": (10, 200, 30),
    }
    for name, colour in expected.items():
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (6, 4)
        assert image.getpixel((2, 2)) == colour, name


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rotated.jpg").size == (4, 8)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError, match=r"broken.jpg is not a readable image"):
        ConceptImages.from_folder(tmp_path, 8)


@pytest.mark.parametrize(
    "limit", [150, 300]
)  # 400 pixels: above twice the limit (PIL raises), above once (warns)
def test_decompression_bombs_are_refused_with_their_size(
    tmp_path: Path, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(
        InputError, match=rf"huge.png has 400 pixels, above the decompression-bomb limit of {limit}"
    ):
        load_rgb(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    assert load_rgb(tmp_path / "huge.png").size == (20, 20)  # at the limit: fine
