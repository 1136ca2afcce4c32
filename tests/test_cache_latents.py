"""Cached latents (`cache_latents`): each photo encoded once before the first step, and each step
sampling the kept posteriors with the draws the uncached path makes. On square photos at `min_crop` 1 a
cached run gives the uncached run's losses (SD 1.x, Flux, with `buckets`, with prior images); a photo that
is not square is cached as its centred crop, its mirror encoded apart; random crops are refused; a
resumed cached run ends where an uninterrupted one does, and `cache_latents` cannot change on resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_factors, interrupted_and_resumed, tiny_config, train_argv
from PIL import Image

from persres import read_residual_file
from persres.backbones import backbone_of
from persres.backbones.vae import Posterior
from persres.cli import main
from persres.cli.flags import for_command_line
from persres.config import TrainConfig
from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError
from persres.training.batches import TrainingData
from persres.training.data import ConceptImages
from persres.training.latent_cache import LatentCache
from persres.training.train import train

MEASURED: dict[str, float] = {}  # max |loss cached - loss uncached| per case, printed with -s


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three square photos of random colours (no crop position to draw)."""
    folder = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def losses(config: TrainConfig, out: Path) -> list[float]:
    seen: list[float] = []
    train(config, out, progress=False, callback=lambda _, loss: seen.append(loss))
    return seen


def largest_difference(config: TrainConfig, tmp_path: Path, case: str) -> float:
    """The largest step's |loss| difference between ``config`` with and without `cache_latents`; the
    residual factors of the two runs are checked to agree too."""
    plain = losses(replace(config, min_crop=1.0), tmp_path / "plain")
    cached = losses(replace(config, min_crop=1.0, cache_latents=True), tmp_path / "cached")
    assert len(plain) == len(cached) == config.steps and len(set(plain)) > 1  # the losses move
    difference = max(abs(a - b) for a, b in zip(plain, cached, strict=True))
    MEASURED[case] = difference
    print(f"cache_latents {case}: max |loss difference| {difference:.3g} over {config.steps} steps")
    result = "residuals.safetensors"
    if (tmp_path / "plain" / result).exists():
        expected = read_residual_file(tmp_path / "plain" / result).tensors
        got = read_residual_file(tmp_path / "cached" / result).tensors
        for key in expected:
            # Adam divides by the gradients' size: a VAE encoding of one photo, not of a batch, differs in
            # the last bits, and after a few steps the factors by up to a few 1e-6
            torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=0)
    return difference


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])  # SD 1.x and Flux
def test_cached_latents_give_the_losses_of_uncached_ones_on_square_photos(
    model: str, squares: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = tiny_config(request.getfixturevalue(model), squares, batch_size=3, lr=5e-2)
    assert config.flip  # flipped photos take their mirror's cached posterior
    assert largest_difference(config, tmp_path, model) <= 1e-6


def test_cached_latents_with_buckets_give_the_uncached_losses_on_square_photos(
    conv_base: Path, squares: Path, tmp_path: Path
) -> None:
    config = tiny_config(conv_base, squares, resolution=32, buckets=True, batch_size=3, steps=4)
    assert largest_difference(config, tmp_path, "buckets") <= 1e-6


def test_cached_latents_of_the_class_images_give_the_uncached_prior_loss(
    conv_base: Path, squares: Path, tmp_path: Path
) -> None:
    config = tiny_config(conv_base, squares, method="dreambooth", prior_images=2, steps=3, lr=1e-4)
    assert largest_difference(config, tmp_path, "dreambooth with prior images") <= 1e-6


def test_random_crops_are_refused_naming_both_settings(conv_base: Path, photos: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        tiny_config(conv_base, photos, cache_latents=True)  # min_crop 0.85, the default
    message = str(refused.value)
    assert "`cache_latents`" in message and "`min_crop` 0.85" in message and "set `min_crop` 1" in message
    assert "--cache-latents" in for_command_line(message)
    assert tiny_config(conv_base, photos, cache_latents=True, min_crop=1.0).cache_latents
    assert not TrainConfig(base="b", images="i", class_word="dog").cache_latents  # off by default


def test_a_photo_that_is_not_square_is_cached_as_its_centred_crop_and_its_mirror(
    conv_base: Path, photos: Path
) -> None:
    pipe = load_pipeline(str(conv_base))
    backbone, device = backbone_of(pipe), torch.device("cpu")
    images = ConceptImages.from_folder(photos, 16)
    cache = LatentCache.encode(images, lambda p: backbone.posterior(pipe, p, device), flip=True)
    assert cache.mirrors is not None and cache.sizes == [(16, 16)] * 3
    tall = images.tensors[2]  # 28 x 24 resized to 19 x 16: rows 2..17 are its centred square
    assert tall.shape == (3, 19, 16)
    centred = tall[:, 2:18, :][None]
    expected = backbone.posterior(pipe, centred, device)
    torch.testing.assert_close(cache.photos[2].mean, expected.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.photos[2].std, expected.std, atol=1e-6, rtol=0)
    mirrored = backbone.posterior(pipe, centred.flip(-1), device)
    torch.testing.assert_close(cache.mirrors[2].mean, mirrored.mean, atol=1e-6, rtol=0)
    # the VAE is not flip-equivariant: a flipped latent is not the mirror's
    assert (cache.mirrors[2].mean - cache.photos[2].mean.flip(-1)).abs().max() > 1e-3


@pytest.mark.parametrize("with_buckets", [False, True])
@pytest.mark.parametrize("folder", ["photos", "squares"])
def test_a_cached_batch_makes_the_uncached_draws(
    folder: str, with_buckets: bool, request: pytest.FixtureRequest
) -> None:
    images = ConceptImages.from_folder(request.getfixturevalue(folder), 64)
    data = TrainingData.of(images, "a photo of a sks dog", None, 32 if with_buckets else None)

    def fake(pixels: torch.Tensor) -> Posterior:  # each photo's pixels stand for its posterior
        return Posterior(pixels, torch.zeros_like(pixels))

    cache = LatentCache.encode(images, fake, True, data.buckets)
    for seed in range(20):
        uncached, cached = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        drawn = data.draw(3, uncached, 1.0, True)
        chosen = data.draw(3, cached, 1.0, True, cache)
        assert torch.equal(uncached.get_state(), cached.get_state())  # the stream stays aligned
        assert chosen.prompts == drawn.prompts and chosen.size == drawn.size  # the same photos, buckets
        assert isinstance(chosen.pixels, Posterior) and isinstance(drawn.pixels, torch.Tensor)
        if folder == "squares":  # min_crop 1 on square photos: the random crops are the fixed ones
            assert torch.equal(chosen.pixels.mean, drawn.pixels)


def test_a_resumed_cached_run_equals_an_uninterrupted_one(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    config = tiny_config(conv_base, photos, cache_latents=True, min_crop=1.0)
    whole = train(config, tmp_path / "whole", progress=False)
    assert_same_factors(interrupted_and_resumed(config, tmp_path / "split", 5), whole.residuals)
    uncached = replace(config, cache_latents=False, steps=8)
    assert uncached.resumable_with(config) == ["cache_latents"]  # it fixes the crops: not free
    with pytest.raises(ConfigError, match=r"settings differ .*\['cache_latents'\]"):
        train(uncached, tmp_path / "split", resume=True, progress=False)


def test_the_command_line_caches_latents_at_fixed_crops(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    assert main(train_argv(flux_base, photos, tmp_path / "run", "--cache-latents")) == 0
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (written["cache_latents"], written["min_crop"]) == (True, 1.0)
    assert main(train_argv(flux_base, photos, tmp_path / "plain")) == 0
    written = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (written["cache_latents"], written["min_crop"]) == (False, 0.85)


def test_old_configs_load_without_the_setting(conv_base: Path, photos: Path) -> None:
    config = tiny_config(conv_base, photos)
    old = {k: v for k, v in config.to_dict().items() if k != "cache_latents"}
    assert TrainConfig.from_dict(old) == config and not TrainConfig.from_dict(old).cache_latents
