"""`release_text_encoders`: the training prompts encoded once, the text encoders dropped and freed; the
same losses and residuals as with them loaded, on SD 1.x, SDXL and Flux; refusals in one line."""

from __future__ import annotations

import csv
import gc
import logging
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_factors, tiny_config, train_argv
from PIL import Image

from persres import read_residual_file
from persres.cli import main
from persres.config import TrainConfig
from persres.core.pipeline import load_pipeline, release_text_encoders, text_towers
from persres.errors import ConfigError
from persres.formats.concepts import Concept
from persres.inference.sampling import SampleSettings, encode_prompts, sample
from persres.methods.catalog import METHODS
from persres.training.train import train


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "logs" / "loss.csv") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def assert_same_run(got: Path, expected: Path) -> None:
    """loss.csv and the residual file within 1e-6."""
    mine, theirs = losses(got), losses(expected)
    assert [s for s, _ in mine] == [s for s, _ in theirs] and mine
    torch.testing.assert_close(
        torch.tensor([v for _, v in mine], dtype=torch.float64),
        torch.tensor([v for _, v in theirs], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert_same_factors(got, expected)
    a = read_residual_file(got).tensors
    assert any(t.abs().sum() > 0 for k, t in a.items() if k.endswith(".A"))  # it trained


@pytest.mark.parametrize("model", ["conv_base", "xl_base", "flux_base"])
def test_releasing_drops_every_text_encoder_and_frees_it(model: str, request: pytest.FixtureRequest) -> None:
    pipe = load_pipeline(str(request.getfixturevalue(model)))
    towers = text_towers(pipe)
    expected = sum(p.numel() for _, encoder in towers for p in encoder.parameters())
    alive = [weakref.ref(encoder) for _, encoder in towers]
    assert len(alive) == (1 if model == "conv_base" else 2)
    del towers
    assert release_text_encoders(pipe) == expected > 0
    gc.collect()
    assert all(ref() is None for ref in alive)  # nothing else held them: their memory is free
    assert all(encoder is None for _, encoder in text_towers(pipe))
    assert all(tokenizer is not None for tokenizer, _ in text_towers(pipe))


@pytest.mark.parametrize("model", ["conv_base", "xl_base"])
def test_sd_runs_with_the_encoders_released_equal_runs_with_them_loaded(
    model: str, photos: Path, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(request.getfixturevalue(model), photos)
    train(config, tmp_path / "loaded", progress=False)
    with caplog.at_level(logging.INFO, logger="persres.training.train"):
        train(replace(config, release_text_encoders=True), tmp_path / "released", progress=False)
    assert "text encoders released:" in caplog.text  # the run trained without them
    assert_same_run(tmp_path / "released", tmp_path / "loaded")


def test_sd_captions_and_prior_with_the_encoders_released(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    """Every prompt the steps use (each caption's, and DreamBooth's class prompt) is encoded up front."""
    flags = ("--steps", "3", "--method", "dreambooth", "--prior-images", "2", "--buckets")
    assert main(train_argv(conv_base, photos, tmp_path / "loaded", *flags)) == 0
    assert main(train_argv(conv_base, photos, tmp_path / "released", *flags, "--release-text-encoders")) == 0
    mine, theirs = losses(tmp_path / "released"), losses(tmp_path / "loaded")
    assert len(mine) == 3 and all(abs(a[1] - b[1]) <= 1e-6 for a, b in zip(mine, theirs, strict=True))


def test_flux_runs_with_the_encoders_released_equal_runs_with_them_loaded_and_resume(
    flux_base: Path, photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    every = ("--checkpoint-every", "2", "--rank", "4", "--steps", "4")
    release = "--release-text-encoders"
    assert main(train_argv(flux_base, photos, tmp_path / "loaded", *every)) == 0
    with caplog.at_level(logging.INFO, logger="persres.training.train"):
        assert main(train_argv(flux_base, photos, tmp_path / "released", *every, release)) == 0
    assert "text encoders released:" in caplog.text  # CLIP and T5, dropped before the first step
    assert_same_run(tmp_path / "released", tmp_path / "loaded")
    # interrupted after 2 steps and resumed, released in both parts: the uninterrupted run's result
    assert main(train_argv(flux_base, photos, tmp_path / "split", *every, "--steps", "2", release)) == 0
    assert main(train_argv(flux_base, photos, tmp_path / "split", *every, "--resume", release)) == 0
    assert_same_run(tmp_path / "split", tmp_path / "loaded")


def test_methods_that_train_the_text_side_are_refused_by_name(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    refused = [name for name, info in METHODS.items() if info.trains_text_side]
    assert "textual-inversion" in refused and "residuals" not in refused
    for method in refused:
        out = tmp_path / method
        argv = train_argv(conv_base, photos, out, "--method", method, "--release-text-encoders")
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--release-text-encoders" in err and f"--method {method}" in err
        assert "trains the text side" in err and not out.exists()
    with pytest.raises(ConfigError, match="`release_text_encoders` cannot be used with `method` perfusion"):
        tiny_config(conv_base, photos, method="perfusion", release_text_encoders=True)


@pytest.mark.parametrize("model", ["conv_base", "xl_base", "flux_base"])
def test_validation_images_with_the_encoders_released_equal_those_with_them_loaded(
    model: str, photos: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The validation prompts are encoded before the encoders go, and sampled from their embeddings."""
    base = request.getfixturevalue(model)
    flags = ("--steps", "2", "--validation-prompt", "a V* dog", "--validation-prompt", "a V* dog in snow")
    assert main(train_argv(base, photos, tmp_path / "loaded", *flags, "--validation-every", "1")) == 0
    released = train_argv(base, photos, tmp_path / "released", *flags, "--validation-every", "1")
    assert main([*released, "--release-text-encoders"]) == 0
    loaded = tmp_path / "loaded"
    folders = sorted(p.relative_to(loaded) for p in (loaded / "validation").rglob("*.png"))
    assert len(folders) == 2 * 3  # steps 1 and 2: two prompts and a grid each
    for name in folders:
        mine = np.asarray(Image.open(tmp_path / "released" / name))
        theirs = np.asarray(Image.open(tmp_path / "loaded" / name))
        assert np.array_equal(mine, theirs), name
    assert_same_run(tmp_path / "released", tmp_path / "loaded")


def test_a_prompt_not_encoded_before_the_release_is_refused_by_name(conv_base: Path) -> None:
    pipe = load_pipeline(str(conv_base))
    concepts = [Concept("sks", "dog")]
    encoded = encode_prompts(pipe, ["a V* dog"], concepts)
    release_text_encoders(pipe)
    settings = SampleSettings(steps=2, height=16, width=16)
    [image] = sample(pipe, ["a V* dog"], concepts, settings, progress=False, encoded=encoded)
    assert image.image.size == (16, 16)
    with pytest.raises(ConfigError, match="the text encoders are released .* 'a V\\* cat' was not encoded"):
        sample(pipe, ["a V* cat"], concepts, settings, progress=False, encoded=encoded)


def test_old_configs_load_without_the_setting_and_it_may_change_on_resume(
    conv_base: Path, photos: Path
) -> None:
    config = tiny_config(conv_base, photos)
    old = {k: v for k, v in config.to_dict().items() if k != "release_text_encoders"}
    loaded = TrainConfig.from_dict(old)
    assert loaded == config and not loaded.release_text_encoders
    released = tiny_config(conv_base, photos, release_text_encoders=True)
    assert released.resumable_with(config) == []
