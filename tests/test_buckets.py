"""Aspect-ratio buckets (`buckets`): kohya's bucket sizes, one shape per batch, draws reproducible from
the seed; a run with captions and buckets, interrupted and resumed, ends where an uninterrupted one does;
with both off the batches are the ones persres drew before they existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_factors, interrupted_and_resumed, tiny_config
from PIL import Image

from persres.backbones.unet import SD, SDXL, Conditioning
from persres.errors import ConfigError
from persres.training.batches import TrainingData
from persres.training.buckets import Buckets, bucket_sizes, nearest_bucket, window_at
from persres.training.data import ConceptImages, augment_draws
from persres.training.train import train

# kohya sd-scripts' buckets at 512 px (make_bucket_resolutions((512, 512), 256, 1024, 64)), as (H, W)
KOHYA_PAIRS = [
    (256, 1024), (320, 768), (384, 640), (448, 576), (320, 704), (256, 832), (256, 896), (256, 960),
]  # fmt: skip
KOHYA_512 = {(512, 512)} | {pair for h, w in KOHYA_PAIRS for pair in ((h, w), (w, h))}


def test_bucket_sizes_are_kohya_s() -> None:
    assert set(bucket_sizes(512, 64)) == KOHYA_512
    sdxl = bucket_sizes(1024, 64)
    assert {(1024, 1024), (832, 1216), (1216, 832), (768, 1344)} <= set(sdxl)  # SDXL's published sizes
    for resolution, step in ((512, 64), (1024, 64), (768, 64), (32, 16)):
        for h, w in bucket_sizes(resolution, step):
            assert h % step == 0 and w % step == 0 and h * w <= resolution**2
            assert resolution // 2 <= min(h, w) and max(h, w) <= 2 * resolution
    assert bucket_sizes(32, 16) == [(16, 48), (16, 64), (32, 32), (48, 16), (64, 16)]
    with pytest.raises(ConfigError, match="`buckets` needs a `resolution` of at least 64"):
        bucket_sizes(32, 64)


def test_each_photo_goes_to_the_bucket_nearest_its_ratio() -> None:
    sizes = bucket_sizes(512, 64)
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert nearest_bucket(3000, 4000, sizes) == (448, 576)  # 4:3 -> 1.29
    assert nearest_bucket(4000, 3000, sizes) == (576, 448)
    assert nearest_bucket(1080, 1920, sizes) == (384, 640)  # 16:9 -> 1.67
    assert nearest_bucket(100, 1000, sizes) == (256, 1024)  # beyond the widest: the widest


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """Five photos: two wide (1:3), one square, two tall (3:1)."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 60), (30, 90), (40, 40), (60, 20), (90, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_every_batch_is_of_one_bucket_and_reproducible(shapes: Path) -> None:
    images = ConceptImages.from_folder(shapes, 32)
    data = TrainingData.of(images, "a photo of a sks dog", None, 16)
    assert data.buckets is not None
    assert data.buckets.of_photo == [(16, 48), (16, 48), (32, 32), (48, 16), (48, 16)]
    generator, seen = torch.Generator().manual_seed(0), set()
    for _ in range(40):
        drawn = data.draw(3, generator, 0.85, True)
        seen.add(tuple(drawn.pixels.shape))
        assert drawn.pixels.min() >= -1 and drawn.pixels.max() <= 1
    assert seen == {(3, 3, 16, 48), (3, 3, 32, 32), (3, 3, 48, 16)}
    first = data.draw(4, torch.Generator().manual_seed(7), 0.85, True)
    assert torch.equal(first.pixels, data.draw(4, torch.Generator().manual_seed(7), 0.85, True).pixels)


def test_picks_share_a_bucket_and_draw_every_photo_alike() -> None:
    buckets = Buckets.assign([(10, 30), (10, 30), (10, 10), (30, 10)], 32, 16)
    counts = [0] * 4
    generator = torch.Generator().manual_seed(1)
    for _ in range(2000):
        picks = buckets.picks(4, generator)
        assert len({buckets.of_photo[i] for i in picks}) == 1
        for i in picks:
            counts[i] += 1
    assert all(abs(c / 2000 - 1.0) < 0.1 for c in counts)  # 4 images a step, 4 photos: once a step each


def test_a_window_keeps_the_photo_when_it_has_the_bucket_s_ratio() -> None:
    image = torch.rand(3, 32, 96) * 2 - 1
    draws = augment_draws(torch.Generator().manual_seed(0))
    kept = window_at(image, (32, 96), draws, 1.0, False)
    assert torch.equal(kept, image)
    resized = window_at(image, (16, 48), draws, 1.0, False)
    expected = F.interpolate(image[None], size=(16, 48), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(resized, expected[0])
    tall = window_at(
        torch.rand(3, 96, 32), (32, 32), augment_draws(torch.Generator().manual_seed(0)), 1.0, False
    )
    assert tall.shape == (3, 32, 32)  # cropped to the bucket's ratio, not squeezed


def old_batch(images: ConceptImages, size: int, generator: torch.Generator, min_crop: float) -> torch.Tensor:
    """``ConceptImages.batch`` as it was before buckets and captions (with flips), written out."""
    picks = torch.randint(len(images.tensors), (size,), generator=generator).tolist()
    out = []
    for i in picks:
        image = images.tensors[i]
        _, height, width = image.shape
        draws = torch.rand(4, generator=generator).tolist()
        side = round(min(height, width) * (min_crop + (1.0 - min_crop) * draws[0]))
        top, left = int(draws[1] * (height - side + 1)), int(draws[2] * (width - side + 1))
        crop = image[:, top : top + side, left : left + side]
        if side != images.resolution:
            crop = F.interpolate(
                crop[None], (images.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False
            )[0]
        out.append(crop.flip(-1) if draws[3] < 0.5 else crop)
    return torch.stack(out)


def test_without_buckets_the_batches_are_the_ones_drawn_before(shapes: Path) -> None:
    images = ConceptImages.from_folder(shapes, 32)
    new, old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        assert torch.equal(images.batch(4, new, 0.85, True), old_batch(images, 4, old, 0.85))


def test_sdxl_size_ids_say_the_bucket_s_size() -> None:
    parts = [Conditioning(torch.randn(1, 5, 8), torch.randn(1, 4), torch.zeros(1, 6)) for _ in range(2)]
    joined = SDXL.join_conditioning(parts, (16, 48))
    assert joined.time_ids is not None and joined.pooled is not None
    assert joined.time_ids.tolist() == [[16, 48, 0, 0, 16, 48]] * 2
    assert torch.equal(joined.pooled, torch.cat([p.pooled for p in parts if p.pooled is not None]))
    plain = SD.join_conditioning(parts, (16, 48))
    assert torch.equal(plain.hidden, torch.cat([p.hidden for p in parts])) and plain.time_ids is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["conv_base", "xl_base", "flux_base"])
def test_captions_and_buckets_resumed_equal_uninterrupted(
    model: str, shapes: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (shapes / "p0.txt").write_text("a photo of a V* dog on the grass")
    (shapes / "p3.txt").write_text("[trigger] dog in the snow")
    config = tiny_config(
        request.getfixturevalue(model), shapes, resolution=32, captions=True, buckets=True, batch_size=3
    )
    whole = train(config, tmp_path / "whole", progress=False)
    assert_same_factors(interrupted_and_resumed(config, tmp_path / "split", 5), whole.residuals)
    written = json.loads((tmp_path / "split" / "config.json").read_text())
    assert (written["captions"], written["buckets"]) == (True, True)
    with pytest.raises(ConfigError, match=r"settings differ .*\['buckets'\]"):
        train(tiny_config(request.getfixturevalue(model), shapes, resolution=32, captions=True, steps=8,
                          batch_size=3), tmp_path / "split", resume=True, progress=False)  # fmt: skip


def test_the_app_offers_buckets_off_by_default() -> None:
    pytest.importorskip("gradio")
    from persres.app.jobs import TOY_RECIPE, make_config

    assert make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "0.05", TOY_RECIPE, buckets=True).buckets
    assert not make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "0.05", TOY_RECIPE).buckets
