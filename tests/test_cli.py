"""The command-line contract end to end on tiny models: train -> sample -> info -> merge, and bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import run_unet, train_argv, unet_inputs
from PIL import Image

from persres import __version__, load_residuals
from persres.cli import build_parser, main
from persres.config import ResidualConfig, TrainConfig
from persres.testing.tiny import save_tiny_pipeline

TRAIN = ["--class-word", "dog", "--steps", "3", "--batch-size", "2", "--resolution", "16", "--device", "cpu"]
SAMPLE = ["--steps", "3", "--device", "cpu"]


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one clear line
    return err


@pytest.fixture(scope="module")
def trained(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--base", str(conv_base), "--images", str(photos), "--out", str(out), *TRAIN]) == 0
    return out / "residuals.safetensors"


def test_train_sample_info_merge(
    base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--base", str(base), "--images", str(photos), "--out", str(run), *TRAIN, "--rank", "2"]
        )
        == 0
    )
    residuals = run / "residuals.safetensors"
    assert residuals.is_file() and json.loads((run / "config.json").read_text())["flip"] is True
    capsys.readouterr()

    images = tmp_path / "images"
    prompts = ["a photo of a V* dog on the beach", "a painting of a V* dog"]
    argv = ["sample", "--base", str(base), "--residuals", str(residuals), "--out", str(images), *SAMPLE]
    assert main(argv + ["--prompt", prompts[0], "--prompt", prompts[1], "--num-images", "2"]) == 0
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 4 and len(list(images.glob("*.json"))) == 4
    sidecar = json.loads(pngs[1].with_suffix(".json").read_text())
    assert (
        sidecar["prompt"] == prompts[0] and sidecar["expanded_prompt"] == "a photo of a sks dog on the beach"
    )
    assert sidecar["seed"] == 1 and sidecar["steps"] == 3 and sidecar["guidance"] == 7.5
    assert (sidecar["height"], sidecar["width"]) == (16, 16)

    # the same seed gives the same image; new files never replace old ones
    assert main(argv + ["--prompt", prompts[0], "--seed", "1"]) == 0
    again = sorted(images.glob("*.png"))
    assert len(again) == 5 and again[:4] == pngs
    assert np.array_equal(np.asarray(Image.open(again[4])), np.asarray(Image.open(pngs[1])))
    assert not np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(Image.open(pngs[1])))
    capsys.readouterr()

    assert main(["info", str(residuals)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["token"] == "sks" and info["class_word"] == "dog" and info["base_model"] == str(base)
    assert info["format_version"] == 1 and info["steps"] == 3
    assert [layer["rank"] for layer in info["layers"]] == [2, 2, 2, 2]
    assert info["total_parameters"] == sum(2 * layer["m"] * layer["rank"] for layer in info["layers"]) == 640

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--residuals", str(residuals), "--out", str(merged)]) == 0
    plain = StableDiffusionPipeline.from_pretrained(merged, use_safetensors=True)  # no persres involved
    assert type(plain.scheduler).__name__ == "PNDMScheduler"  # the base's own, not persres' DDIM
    assert (merged / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o044 == 0o044
    personalized = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    load_residuals(personalized.unet, residuals)
    inputs = unet_inputs(plain.unet)
    baseline = run_unet(StableDiffusionPipeline.from_pretrained(base, use_safetensors=True).unet, inputs)
    expected = run_unet(personalized.unet, inputs)
    assert (expected - baseline).abs().max() > 1e-6  # training moved the model
    torch.testing.assert_close(run_unet(plain.unet, inputs), expected, atol=1e-5, rtol=1e-5)
    assert "already exists" in error_of(
        capsys, ["merge", "--base", str(base), "--residuals", str(residuals), "--out", str(merged)]
    )


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    version = subprocess.run([sys.executable, "-m", "persres", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"persres {__version__}"
    commands = subcommands()
    assert {"train", "sample", "info", "merge", "evaluate", "benchmark", "report"} < set(commands)
    for command in commands:
        assert main([command, "--help"]) == 0
        assert "usage: persres " + command in capsys.readouterr().out


def test_bad_images_are_named(conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["train", "--base", str(conv_base), "--out", str(out), *TRAIN, "--images"]
    assert "not found" in error_of(capsys, argv + [str(tmp_path / "absent")])
    (tmp_path / "empty").mkdir()
    assert "is empty" in error_of(capsys, argv + [str(tmp_path / "empty")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cat.png").write_bytes(b"\x89PNG garbage")
    assert "cat.png is not a readable image" in error_of(capsys, argv + [str(tmp_path / "bad")])
    assert not out.exists()


def test_bad_bases_fail_fast(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--images", str(photos), "--out", str(tmp_path / "out"), *TRAIN, "--base"]
    assert "not a diffusers pipeline folder" in error_of(capsys, argv + [str(photos)])
    assert "no such folder" in error_of(capsys, argv + [str(tmp_path / "nothing")])
    assert "not in the local cache" in error_of(capsys, argv + ["nobody/no-such-model"])
    assert not (tmp_path / "out" / "config.json").exists()


def test_bad_ranks(conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(tmp_path / "o"), *TRAIN]
    assert "must be >= 1" in error_of(capsys, argv + ["--rank", "0"])
    assert "above the width 32 of layer down_blocks.0" in error_of(capsys, argv + ["--rank", "40"])
    assert "not a number" in error_of(capsys, argv + ["--rank", "big"])


def test_existing_run_is_not_clobbered(
    conv_base: Path, photos: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = trained.read_bytes()
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(trained.parent), *TRAIN]
    assert "already holds a training run" in error_of(capsys, argv)
    assert trained.read_bytes() == before


def test_residuals_for_another_architecture(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_tiny_pipeline(tmp_path / "wide", widths=(48, 64))
    argv = ["--residuals", str(trained), "--out", str(tmp_path / "x")]
    err = error_of(capsys, ["sample", "--base", str(other), *argv, *SAMPLE, "--prompt", "a V* dog"])
    assert "down_blocks.0.attentions.0.proj_out does not fit" in err and "(48, 48, 1, 1)" in err
    err = error_of(capsys, ["merge", "--base", str(other), *argv])
    assert "does not fit" in err
    assert not (tmp_path / "x").exists()


def test_files_that_are_not_safetensors(
    conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "pytorch_lora_weights.bin"
    pickled.write_bytes(b"\x80\x04\x95\x00 pickle")
    assert "is not a safetensors file" in error_of(capsys, ["info", str(pickled)])
    argv = ["sample", "--base", str(conv_base), "--residuals", str(pickled), "--out", str(tmp_path / "x")]
    assert "is not a safetensors file" in error_of(capsys, argv + ["--prompt", "a V* dog"])
    assert not (tmp_path / "x").exists()


def test_sample_both_with_masks_and_two_concepts(
    conv_base: Path, photos: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "images"
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(out), *SAMPLE]
    assert main(argv + ["--prompt", "a V* dog on the beach", "--sampler", "both", "--save-masks"]) == 0
    names = sorted(p.name for p in out.iterdir())
    stem = "0000-a-v-dog-on-the-beach"
    assert names == sorted(
        f"{stem}-{suffix}"
        for suffix in ("normal.png", "normal.json", "lag.png", "lag.json", "both.png", "lag-masks.png")
    )
    grid = Image.open(out / f"{stem}-both.png")
    assert grid.size == (16 * 2 + 2, 16)
    strip = Image.open(out / f"{stem}-lag-masks.png")
    assert strip.size == (2 + 3 * (48 + 2), 2 + 2 * (48 + 2))  # 3 steps x 2 resolutions (8x8, 4x4)
    assert set(np.unique(np.asarray(strip))) >= {0, 255}
    assert json.loads((out / f"{stem}-lag.json").read_text())["sampler"] == "lag"

    cat_run = tmp_path / "cat"
    cat_argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(cat_run), *TRAIN]
    assert main([*cat_argv[: -len(TRAIN)], *TRAIN[2:], "--class-word", "cat", "--token", "zwx"]) == 0
    cat = cat_run / "residuals.safetensors"
    two = [
        "sample",
        "--base",
        str(conv_base),
        "--residuals",
        str(trained),
        "--residuals",
        str(cat),
        "--out",
        str(out),
        *SAMPLE,
        "--sampler",
        "lag",
        "--save-masks",
    ]
    assert main(two + ["--prompt", "a V1* dog playing with a V2* cat"]) == 0
    capsys.readouterr()
    sidecar = json.loads(next(out.glob("0001-*-lag.json")).read_text())
    assert [c["token"] for c in sidecar["concepts"]] == ["sks", "zwx"]
    assert [c["placeholder"] for c in sidecar["concepts"]] == ["V1*", "V2*"]
    assert len(list(out.glob("0001-*-lag-masks-V*.png"))) == 2
    assert "uses V* but 2 residual files" in error_of(capsys, two + ["--prompt", "a V* dog"])
    assert "is not used by any prompt" in error_of(capsys, two + ["--prompt", "a V1* dog"])


def test_lag_prompt_errors(
    conv_base: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sample",
        "--base",
        str(conv_base),
        "--residuals",
        str(trained),
        "--out",
        str(tmp_path / "o"),
        *SAMPLE,
    ]
    assert "no class word 'dog'" in error_of(
        capsys, argv + ["--sampler", "lag", "--prompt", "a photo of a V*"]
    )
    assert "has no V*" in error_of(capsys, argv + ["--sampler", "lag", "--prompt", "a photo of a dog"])
    assert "--save-masks" in error_of(capsys, argv + ["--save-masks", "--prompt", "a V* dog"])
    assert not (tmp_path / "o").exists()


def test_no_flip_reaches_the_training_config(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--no-flip")) == 0
    assert json.loads((run / "config.json").read_text())["flip"] is False


def test_report_to_a_tracker_that_is_not_installed_fails_before_training(
    conv_base: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # whatever this venv holds
    monkeypatch.setattr("persres.training.trainlog.installed", lambda package: False)
    out = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(out), *TRAIN]
    argv.append("--report-to")
    assert "pip install tensorboard" in error_of(capsys, [*argv, "tensorboard"])
    assert "pip install wandb" in error_of(capsys, [*argv, "wandb"])
    assert not out.exists()


def test_validation_every_needs_a_prompt_and_a_positive_count(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(out), *TRAIN]
    message = error_of(capsys, [*argv, "--validation-every", "2"])
    assert "--validation-every" in message and "--validation-prompt" in message
    assert "argument --validation-every: must be an integer in [1, 1000000]" in error_of(
        capsys, [*argv, "--validation-every", "0", "--validation-prompt", "a V* dog"]
    )
    assert not out.exists()


@pytest.mark.slow
def test_train_logs_its_loss_and_validates_every_n_steps(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(run), *TRAIN]
    argv += ["--report-to", "none", "--validation-every", "2", "--validation-prompt", "a V* dog"]
    assert main(argv) == 0
    lines = (run / "logs" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,smoothed_loss,lr,elapsed_seconds" and len(lines) == 4
    assert (run / "logs" / "loss.png").is_file()
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000002", "step-000003"]
    config = json.loads((run / "config.json").read_text())
    assert config["validation_every"] == 2 and config["report_to"] == "none"


@pytest.mark.parametrize(
    "limit", [150, 300]
)  # 400 pixels: above twice the limit (PIL raises), above it (PIL warns)
def test_decompression_bombs_are_refused_by_train(
    conv_base: Path,
    tmp_path: Path,
    limit: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "small.png")
    Image.new("RGB", (20, 20)).save(photos / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    out = tmp_path / "out"
    err = error_of(
        capsys, ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(out), *TRAIN]
    )
    assert "bomb.png has 400 pixels, above the decompression-bomb limit" in err
    assert not out.exists()


def test_a_prompt_whose_identifier_is_cut_off_is_refused(
    conv_base: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(out), *SAMPLE]
    err = error_of(capsys, argv + ["--prompt", "a " * 80 + "V* dog"])  # V* is token 82 of 84
    assert (
        "is 84 tokens and its identifier V* ('sks') falls past the text encoder's limit of 77 tokens" in err
    )
    assert len(err) < 500 and not out.exists()


def test_a_prompt_cut_after_its_identifier_is_sampled_with_a_warning(
    conv_base: Path,
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompt = "a V* dog" + " on the beach" * 30
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(tmp_path / "o")]
    with caplog.at_level(logging.WARNING, logger="persres"):
        assert main([*argv, *SAMPLE, "--prompt", prompt]) == 0
    assert (
        f"prompt {prompt[:60]!r}... (398 characters) is 95 tokens: the text encoder reads 77" in caplog.text
    )


def test_sample_numbers_after_a_stray_sidecar_and_overwrites_nothing(
    conv_base: Path, trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "0000-a-v-dog-normal.json").write_text("{}")  # its PNG was deleted
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(out), *SAMPLE]
    assert main([*argv, "--prompt", "a V* dog"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "0000-a-v-dog-normal.json",
        "0001-a-v-dog-normal.json",
        "0001-a-v-dog-normal.png",
    ]
    assert (out / "0000-a-v-dog-normal.json").read_text() == "{}"


def test_suggest_token_refuses_what_is_not_a_model(
    conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "not a diffusers pipeline folder" in error_of(capsys, ["suggest-token", "--base", str(tmp_path)])
    assert "not in the local cache" in error_of(capsys, ["suggest-token", "--base", "nobody/no-such-model"])
    partial = tmp_path / "partial"
    shutil.copytree(conv_base, partial, ignore=shutil.ignore_patterns("tokenizer"))
    err = error_of(capsys, ["suggest-token", "--base", str(partial)])
    assert f"cannot load base model folder {partial}: it has no tokenizer" in err
    assert main(["suggest-token", "--base", str(conv_base), "--top", "2"]) == 0
    assert capsys.readouterr().out.split() == ["zwx", "sks"]


def test_errors_quote_at_most_a_few_dozen_characters_of_a_prompt(
    conv_base: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "a V3* dog" + " on the beach" * 6200  # 80 KB
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(tmp_path / "o")]
    err = error_of(capsys, [*argv, *SAMPLE, "--prompt", prompt])
    assert "uses V3* but only 1 concept(s) are loaded" in err and "(80,609 characters)" in err
    assert len(err) < 500


def subcommands() -> list[str]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_help_and_argument_errors_never_import_torch() -> None:
    check = (
        "import sys, contextlib, io\n"
        "from persres.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    codes = [main([c, '--help']) for c in {subcommands()!r}]\n"
        "    codes.append(main(['sample', '--steps', '0']))\n"
        "    codes.append(main(['info', '/nowhere/residuals.safetensors']))\n"
        "    codes.append(main(['report', '/nowhere']))\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    codes, heavy = done.stdout.rsplit("] ", 1)
    assert heavy.strip() == "[]", done.stdout
    assert codes.endswith("0, 2, 2, 2"), done.stdout


BAD_NUMBERS = [
    ("sample", "--guidance", "inf", "[0, 100]"),
    ("sample", "--guidance", "nan", "[0, 100]"),
    ("sample", "--guidance", "-1", "[0, 100]"),
    ("sample", "--steps", "0", "[1, 1000]"),
    ("sample", "--steps", "5000", "[1, 1000]"),
    ("sample", "--seed", "-1", "[0, 4294967295]"),
    ("sample", "--seed", "1e3", "[0, 4294967295]"),
    ("sample", "--num-images", "0", "[1, 10000]"),
    ("sample", "--height", "36", "multiple of 8"),
    ("sample", "--width", "0", "[8, 8192]"),
    ("train", "--lr", "nan", "(0, 1]"),
    ("train", "--lr", "0", "(0, 1]"),
    ("train", "--steps", "0", "[1, 1000000]"),
    ("train", "--batch-size", "-2", "[1, 1024]"),
    ("train", "--resolution", "100", "multiple of 8"),
    ("train", "--checkpoint-every", "0", "[1, 1000000]"),
    ("train", "--seed", "-5", "[0, 4294967295]"),
    ("benchmark", "--images-per-prompt", "0", "[1, 10000]"),
    ("benchmark", "--max-prompts", "0", "[1, 10000]"),
    ("benchmark", "--sample-steps", "0", "[1, 1000]"),
    ("benchmark", "--guidance", "inf", "[0, 100]"),
    ("suggest-class", "--top", "0", "[1, 10000]"),
    ("suggest-class", "--margin", "nan", "[0, 1]"),
    ("suggest-token", "--top", "0", "[1, 10000]"),
    ("train", "--batch-size", "100000", "[1, 1024]"),
    ("train", "--prior-images", "10000000", "[0, 10000]"),
    ("train", "--rank", "100000", "<= 4096"),
    ("train", "--rank", "0", ">= 1"),
    ("benchmark", "--rank", "1.5", "a fraction in (0, 1]"),
    ("train", "--rank", "nan", "<= 4096"),
    ("export", "--scale", "1e39", "[-100, 100]"),
]


REQUIRED = {
    "sample": ["--base", "b", "--residuals", "r", "--prompt", "a V* dog", "--out"],
    "train": ["--base", "b", "--images", "i", "--class-word", "dog", "--out"],
    "benchmark": ["--dataset", "d", "--base", "b", "--out"],
    "suggest-class": ["--images", "i", "--clip", "c"],
    "suggest-token": ["--base", "b"],
    "export": ["x", "--format", "kohya", "--out"],
}


@pytest.mark.parametrize(("command", "flag", "value", "valid"), BAD_NUMBERS)
def test_numeric_options_are_checked_when_parsed(
    command: str, flag: str, value: str, valid: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [command, *REQUIRED[command]] + ([str(out)] if REQUIRED[command][-1] == "--out" else [])
    assert main([*argv, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: must be" in err and valid in err, err
    assert not out.exists()


def test_an_unwritable_out_is_refused_before_any_model_is_loaded(
    conv_base: Path, photos: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    absent = str(tmp_path / "no-such-model")  # loading it would fail: the --out check must come first
    commands = [
        ["sample", "--base", absent, "--residuals", str(trained), "--prompt", "a V* dog", "--out", str(out)],
        ["merge", "--base", absent, "--residuals", str(trained), "--out", str(out)],
        [
            "evaluate",
            "--images",
            str(photos),
            "--references",
            str(photos),
            "--clip",
            absent,
            "--out",
            str(out),
        ],
        ["benchmark", "--dataset", absent, "--base", absent, "--out", str(out)],
        ["train", "--base", absent, "--images", str(photos), "--class-word", "dog", "--out", str(out)],
    ]
    for argv in commands:
        err = error_of(capsys, argv)
        assert f"--out {out}" in err and "is a file, not a folder" in err, err


@pytest.mark.slow
def test_commands_print_no_third_party_noise(
    trained: Path, conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    """A fresh process (transformers warns once per process) runs sample and evaluate as a user would:
    neither transformers' torchvision fallback nor its load report of the other CLIP tower shows."""
    from persres.testing.tiny import save_tiny_clip, save_tiny_dino

    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    samples = tmp_path / "samples"
    script = (
        "import sys\nfrom persres.cli import main\n"
        f"sys.exit(main(['sample', '--base', {str(conv_base)!r}, '--residuals', {str(trained)!r}, "
        f"'--prompt', 'a V* dog', '--out', {str(samples)!r}, '--steps', '2', '--device', 'cpu']) or "
        f"main(['evaluate', '--images', {str(samples)!r}, '--references', {str(photos)!r}, "
        f"'--clip', {str(clip)!r}, '--dino', {str(dino)!r}, '--device', 'cpu']))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "clip_t" in done.stdout
    for noise in ("torchvision", "LOAD REPORT", "UNEXPECTED"):
        assert noise not in done.stderr, done.stderr
    demo = [sys.executable, "-m", "persres.toyworld.demo", "--help"]  # the demo steps outside the CLI
    done = subprocess.run(demo, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "torchvision" not in done.stderr, done.stderr


def test_options_of_another_method_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["train", "--base", "b", "--images", "i", "--class-word", "dog", "--out", str(out)]
    err = error_of(capsys, [*base, "--method", "dreambooth", "--rank", "4"])
    assert (
        "--rank does not apply to --method dreambooth (its own options: --prior-images, --prior-weight)"
        in err
    )
    err = error_of(capsys, [*base, "--prior-images", "10", "--init", "random"])  # residuals by default
    assert "--init" not in err.split("does not apply")[0] and "--prior-images does not apply" in err
    assert "argument --method: invalid choice: 'perfusionx'" in error_of(
        capsys, [*base, "--method", "perfusionx"]
    )
    assert not out.exists()


def test_the_recipe_is_the_methods_unless_given() -> None:
    from persres.cli.training import train_config_of

    def settings(*flags: str) -> TrainConfig:
        argv = ["train", "--base", "b", "--images", "i", "--class-word", "dog", "--out", "o", *flags]
        return train_config_of(build_parser().parse_args([*argv, "--resolution", "512"]), "dog", "")

    paper = settings()
    assert (paper.steps, paper.batch_size, paper.lr) == (150, 4, 1e-3)  # Ham et al., section 4
    assert paper.residual == ResidualConfig(rank=0.05, init="zero")
    mine = settings("--steps", "7", "--lr", "0.01", "--rank", "16", "--init", "random")
    assert (mine.steps, mine.batch_size, mine.lr) == (7, 4, 0.01)
    assert mine.residual == ResidualConfig(rank=16, init="random")


def test_an_80_kb_prompt_is_quoted_in_a_few_dozen_characters(
    trained: Path,
    conv_base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Truncation warnings (persres' and diffusers') repeated the whole prompt."""
    prompt = "a photo of a V* dog" + " on the grass" * 6500  # about 85 KB
    argv = ["sample", "--base", str(conv_base), "--residuals", str(trained), "--out", str(tmp_path / "o")]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--prompt", prompt, *SAMPLE, "--height", "16", "--width", "16"]) == 0
    lines = capsys.readouterr().err.splitlines() + caplog.text.splitlines()
    assert any("cut off" in line for line in lines), lines  # persres says so, once, briefly
    long = [line[:200] for line in lines if len(line) >= 500]
    assert not long, long
