"""The web app on a Flux base (``persres app --base SD_FOLDER --base FLUX_FOLDER``: the Train page offers
both), through the functions its Train and Sample pages call: the Train page's recipe is the family's
(rank 21, 1024 px, as ``persres train``), a few steps train on the base chosen, and the Sample page draws
normal and LAG images on the run's own base with Flux's guidance and shows LAG's masks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from persres.config import ResidualConfig
from persres.errors import ConfigError
from persres.files import write_json
from persres.formats.runfolder import REQUEST, RESIDUALS_FILE, SAMPLES, write_marker

pytest.importorskip("gradio", reason="persres app needs gradio: make test installs the app extra")

from persres.app import jobs, sample_page, train_page  # noqa: E402  (after the skip: they import gradio)
from persres.app.common import AppSettings  # noqa: E402
from persres.app.runstore import new_run  # noqa: E402
from persres.toymodels import TOY_BASES, find_toy_model  # noqa: E402


def no_progress(*args: Any, **kwargs: Any) -> None:
    """Stands in for gradio's progress bar outside a request."""


def test_the_train_page_recipe_on_flux_is_the_familys(flux_base: Path, linear_base: Path) -> None:
    flux, sd = jobs.recipe_for(str(flux_base)), jobs.recipe_for(str(linear_base))
    assert (flux.rank, flux.resolution) == (21, 1024)  # as persres train on Flux.1: 0.144% of the base
    assert (sd.rank, sd.resolution) == (ResidualConfig.rank, 512) and sd == jobs.PAPER_RECIPE
    assert (flux.steps, flux.lr, flux.batch_size) == (sd.steps, sd.lr, sd.batch_size)  # the paper's


def test_both_shipped_toy_bases_take_the_toy_recipe() -> None:
    """The toy world's recipe (32 px, 400 steps at 5e-3) on its U-Net base and on its Flux-shaped one; the
    masked, min-SNR-weighted loss on the U-Net's only (measured there; min-SNR weighs DDPM targets)."""
    recipes = {}
    for name in TOY_BASES:
        assert jobs.is_shipped_base(str(find_toy_model(name)))
        recipes[name] = jobs.recipe_for(str(find_toy_model(name)))
    unet, flux = (recipes[name] for name in TOY_BASES)
    assert unet == jobs.TOY_RECIPE and (unet.masked, unet.timestep_weighting) == (True, "min-snr")
    assert flux == replace(unet, masked=False, timestep_weighting="none")


def test_the_app_trains_and_samples_on_a_tiny_flux_base(
    flux_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = replace(jobs.recipe_for(str(flux_base)), resolution=16, batch_size=1)  # 1024 px: minutes here
    monkeypatch.setattr(jobs, "recipe_for", lambda base: recipe)
    toy_unet = str(find_toy_model(TOY_BASES[0]))
    settings = AppSettings(toy_unet, tmp_path / "runs", "cpu", others=(str(flux_base),))  # the U-Net first
    uploads = [str(p) for p in sorted(photos.glob("*.png"))]
    updates = list(train_page.train(settings, uploads, "dog", "sks", "flux-dog", 3, 0.05, "21",
                                    base=str(flux_base), progress=no_progress))  # type: ignore[arg-type]  # fmt: skip
    status, curve = updates[-1]
    assert "step 3/3" in status and "Finished" in status and curve.size[0] > 300
    run = settings.runs / "flux-dog"
    config = json.loads((run / "config.json").read_text())
    assert (config["base"], config["residual"]["rank"], config["resolution"]) == (str(flux_base), 21, 16)
    assert (run / RESIDUALS_FILE).is_file()
    assert len(list((run / "validation").glob("step-000003/*.png"))) == 2  # the image and its grid

    prompt = "a photo of a V* dog"
    shown, masks, slider, samples = sample_page.draw(settings, ["flux-dog"], prompt, "both", 0, 2)
    assert [caption for _, caption in shown] == ["normal", "LAG"]
    normal, lag = (np.asarray(s.image, dtype=np.int16) for s in samples)
    assert normal.shape == lag.shape and not np.array_equal(normal, lag)  # LAG changed the image
    assert [s.guidance for s in samples] == [3.5, 3.5]  # Flux.1-dev's, the page has no guidance field
    assert masks and all(caption.startswith("step 2/2: ") for _, caption in masks)
    assert slider["maximum"] == 1
    sidecars = [json.loads(p.read_text()) for p in (run / SAMPLES).glob("*.json")]
    assert sorted(s["sampler"] for s in sidecars) == ["lag", "normal"]
    assert {s["guidance"] for s in sidecars} == {3.5} and {s["base"] for s in sidecars} == {str(flux_base)}


def test_the_train_page_offers_each_base_with_its_recipe_and_refuses_any_other(
    flux_base: Path, linear_base: Path, photos: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    settings = AppSettings(str(linear_base), runs, "cpu", others=(str(flux_base), str(linear_base)))
    assert settings.bases == (str(linear_base), str(flux_base))  # the first first, each once
    fields = {b: [u["value"] for u in train_page.recipe_fields(settings, b)] for b in settings.bases}
    assert fields[str(flux_base)][2] == "21" and fields[str(linear_base)][2] == str(ResidualConfig.rank)
    assert fields[str(flux_base)][3] is False and fields[str(linear_base)][3] is False  # the paper's
    with pytest.raises(ConfigError, match="not one this app serves; choose one of"):
        train_page.recipe_fields(settings, str(tmp_path))
    uploads = [str(p) for p in sorted(photos.glob("*.png"))]
    with pytest.raises(ConfigError, match=f"base model '{tmp_path}' is not one this app serves"):
        list(train_page.train(settings, uploads, "dog", "sks", "elsewhere", 3, 0.05, "21", base=str(tmp_path),
                              progress=no_progress))  # type: ignore[arg-type]  # fmt: skip
    assert not runs.exists()  # nothing written


def test_runs_trained_on_two_bases_are_not_sampled_together(
    flux_base: Path, linear_base: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    for name, base in (("on-sd", linear_base), ("on-flux", flux_base)):
        recipe = jobs.recipe_for(str(base))
        config = jobs.make_config(str(base), Path("."), "dog", "sks", 3, 0.05, "21", recipe)
        folder = new_run(runs, name)
        write_json(folder / REQUEST, config.to_dict())  # a run as the Train page starts it
        write_marker(folder, [REQUEST])
    assert jobs.trained_base([runs / "on-flux"]) == str(flux_base)
    both = f"on-sd on {linear_base}; on-flux on {flux_base}"
    with pytest.raises(ConfigError, match=f"different base models cannot be sampled together .{both}"):
        jobs.sample_runs(runs, ["on-sd", "on-flux"], "a photo of a V* dog", "normal", 0, 2, "cpu")
    assert not any((runs / name / SAMPLES).exists() for name in ("on-sd", "on-flux"))
