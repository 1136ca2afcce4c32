"""``persres evaluate``, ``benchmark`` and ``report`` on a tiny Flux base (``flux_base``), as
tests/test_evaluate.py and tests/test_benchmark.py run them on tiny SD: residuals (normal, lag, auto) and
LoRA trained, sampled with Flux's guidance and scored; a peer method that does not train on Flux is
refused by name before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import bench_argv, train_argv

from persres.cli import main


def test_evaluate_scores_images_sampled_on_flux(
    flux_base: Path, photos: Path, tmp_path: Path, scorer_models: tuple[str, str],
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    run, images = tmp_path / "run", tmp_path / "images"
    assert main(train_argv(flux_base, photos, run, "--lr", "0.05")) == 0
    argv = ["sample", "--base", str(flux_base), "--residuals", str(run), "--out", str(images), "--prompt",
            "a photo of a V* dog on the beach", "--steps", "2", "--height", "16", "--width", "16",
            "--num-images", "2", "--sampler", "both", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "scores.json"
    argv = ["evaluate", "--images", str(images), "--references", str(photos), "--clip", scorer_models[0],
            "--dino", scorer_models[1], "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["num_images"] == 4 and {"clip_t", "clip_i", "dino_i"} <= set(result)
    per_image = result["images"]
    assert [i["text"] for i in per_image] == ["a photo of a dog on the beach"] * 4  # V* removed
    assert all(-1 <= i["clip_i"] <= 1 and -1 <= i["dino_i"] <= 1 for i in per_image)


def test_benchmark_and_report_on_flux_residuals_and_lora(
    dataset: Path, flux_base: Path, tmp_path: Path, scorer_models: tuple[str, str],
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    out = tmp_path / "bench"
    methods = ("--method", "residuals", "--method", "lora", "--concept", "pet_dog", "--rank", "2")
    assert main([*bench_argv(dataset, flux_base, out, scorer_models), *methods]) == 0
    with open(out / "results.csv") as handle:
        rows = {(r["method"], r["sampler"]): r for r in csv.DictReader(handle)}
    residual = "personalized-residuals"
    assert set(rows) == {(residual, "normal"), (residual, "lag"), (residual, "auto"), ("lora", "normal")}
    # rank 2 on 2 double blocks' to_out.0 (32 in + 32 out) and 2 single blocks' proj_out (32 + 128 in, 32 out)
    assert rows[(residual, "normal")]["trainable_parameters"] == str(2 * 2 * (64 + 192))
    assert all(int(row["num_images"]) == 2 for row in rows.values())
    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["sample"]["guidance"] == 3.5 and settings["base"] == str(flux_base)
    sidecars = list((out / "runs").glob("pet_dog/*/samples/*.json"))
    assert sidecars and {json.loads(p.read_text())["guidance"] for p in sidecars} == {3.5}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "personalized-residuals" in html and "lora" in html and "<img" in html


def test_a_benchmark_of_a_method_that_does_not_train_on_flux_is_refused_before_anything_is_written(
    dataset: Path, flux_base: Path, tmp_path: Path, scorer_models: tuple[str, str],
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    out = tmp_path / "bench"
    methods = ("--method", "residuals", "--method", "dreambooth")
    argv = [*bench_argv(dataset, flux_base, out, scorer_models), *methods]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--method dreambooth supports Stable Diffusion 1.x/2.x here; on Flux.1" in err
    assert "persres trains residuals, lora" in err and len(err.splitlines()) == 1
    assert not out.exists()
