"""Writing samples: names, numbering after every numbered file, and nothing written on a refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import persres.inference.outputs as outputs
from persres.errors import OutputExistsError
from persres.inference.outputs import block_shape, strip, write_samples
from persres.inference.sampling import Sample, SampleSettings


def samples() -> list[Sample]:
    """A normal and a LAG image of one prompt and seed, the LAG one with a mask record."""
    masks = {1: {"mid_block": torch.ones(1, 1, 4)}}
    return [
        Sample("a V* dog", "a sks dog", 0, "normal", Image.new("RGB", (4, 4))),
        Sample("a V* dog", "a sks dog", 0, "lag", Image.new("RGB", (4, 4)), masks, (2, 2)),
    ]


def test_all_names_are_planned_and_numbered_after_any_numbered_file(tmp_path: Path) -> None:
    (tmp_path / "0004-x-lag-masks.png").write_bytes(b"a stray mask strip")
    written = write_samples(tmp_path, samples(), SampleSettings(), {})
    assert [p.name for p in written] == ["0005-a-v-dog-normal.png", "0005-a-v-dog-lag.png"]
    stem = "0005-a-v-dog"
    assert {p.name for p in tmp_path.iterdir()} == {
        "0004-x-lag-masks.png",
        *(f"{stem}-{s}" for s in ("normal.png", "normal.json", "lag.png", "lag.json", "both.png")),
        f"{stem}-lag-masks.png",
    }


@pytest.mark.parametrize(
    "taken", ["0000-a-v-dog-lag.json", "0000-a-v-dog-both.png", "0000-a-v-dog-lag-masks.png"]
)
def test_a_taken_name_refuses_before_anything_is_written(
    tmp_path: Path, taken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "next_free_index", lambda out: 0)  # another writer took the number meanwhile
    (tmp_path / taken).write_bytes(b"earlier")
    with pytest.raises(OutputExistsError, match=f"{taken} already exists .* nothing was written"):
        write_samples(tmp_path, samples(), SampleSettings(), {})
    assert [p.name for p in tmp_path.iterdir()] == [taken]
    assert (tmp_path / taken).read_bytes() == b"earlier"


@pytest.mark.parametrize("size", [(72, 128), (64, 64), (136, 96), (1024, 576)])
def test_mask_strips_for_any_image_size(size: tuple[int, int]) -> None:
    latent = (size[0] // 8, size[1] // 8)
    shapes = [latent]
    for _ in range(3):
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    assert [block_shape(h * w, latent) for h, w in shapes] == shapes
    records = {
        step: {f"b{k}": torch.ones(1, 1, h * w) for k, (h, w) in enumerate(shapes)} for step in range(2)
    }
    image = strip(records, 0, latent)
    assert image.height == 2 + 4 * (48 + 2)
    assert min(image.getdata()) in (96, 255)  # separators grey, masks white
