"""Concept image folders: every PIL mode, EXIF orientation, clear errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from persres.errors import InputError
from persres.training.data import ConceptImages, list_images


def test_non_image_files_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        list_images(tmp_path / "absent")
    with pytest.raises(InputError, match="is empty"):
        list_images(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"ignored")
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="is empty"):
        list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"not images: \['notes.txt'\]"):
        list_images(tmp_path)


def test_more_than_fifty_images_are_refused(tmp_path: Path) -> None:
    for i in range(51):
        Image.new("RGB", (2, 2)).save(tmp_path / f"{i:02d}.png")
    with pytest.raises(InputError, match="holds 51 images"):
        list_images(tmp_path)


def test_batches_are_square_in_range_and_reproducible(photos: Path) -> None:
    images = ConceptImages.from_folder(photos, 16)
    assert all(min(t.shape[1:]) == 16 for t in images.tensors)
    first = images.batch(5, torch.Generator().manual_seed(7), 0.85, True)
    again = images.batch(5, torch.Generator().manual_seed(7), 0.85, True)
    other = images.batch(5, torch.Generator().manual_seed(8), 0.85, True)
    assert first.shape == (5, 3, 16, 16)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= -1.0 and first.max() <= 1.0


def test_flip_only_mirrors(tmp_path: Path) -> None:
    array = np.zeros((8, 8, 3), np.uint8)
    array[:, :4] = 255  # left half white
    Image.fromarray(array).save(tmp_path / "half.png")
    images = ConceptImages.from_folder(tmp_path, 8)
    batch = images.batch(64, torch.Generator().manual_seed(0), 1.0, True)
    left_white = batch[:, 0, :, 0] > 0
    assert 0 < int(left_white.all(dim=1).sum()) < 64  # some flipped, some not
    unflipped = images.batch(16, torch.Generator().manual_seed(0), 1.0, False)
    assert torch.equal(unflipped, images.tensors[0].expand(16, -1, -1, -1))


