"""Edge cases: nothing is lost on bad input, architectures are told apart, masks for any size."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from persres import add_residuals, load_residuals, save_residuals
from persres.cli import main
from persres.concepts import Concept, concept_columns, plan_prompts
from persres.config import ResidualConfig, TrainConfig
from persres.errors import ConfigError, ResidualFileError
from persres.outputs import block_shape, strip
from persres.tiny import word_tokenizer

TRAIN = ["--class-word", "dog", "--steps", "2", "--batch-size", "1", "--resolution", "16", "--device", "cpu"]


def test_a_bad_rank_with_overwrite_keeps_the_earlier_run(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(run), *TRAIN]
    assert main(argv) == 0
    before = sorted(p.name for p in run.iterdir())
    residuals = (run / "residuals.safetensors").read_bytes()
    assert main(argv + ["--overwrite", "--rank", "100000"]) == 2
    assert "above the width" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "residuals.safetensors").read_bytes() == residuals
    assert main(argv[:6] + [str(tmp_path / "fresh"), *TRAIN, "--rank", "100000"]) == 2
    assert not (tmp_path / "fresh").exists()  # no empty folder left behind


def test_bad_validation_prompts_fail_before_training(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(tmp_path / "o"), *TRAIN]
    assert main(argv + ["--validation-prompt", "a V2* dog"]) == 2
    assert "V2*" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_learning_rate_must_be_finite_and_sane() -> None:
    for lr in (0.0, -1.0, math.inf, math.nan, 5.0):
        with pytest.raises(ConfigError, match="lr must be in"):
            TrainConfig(base="b", images="i", class_word="dog", lr=lr)


def test_resume_without_checkpoint_refuses_other_settings(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(run), *TRAIN]
    assert main(argv) == 0
    for folder in (run / "checkpoints").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    before = (run / "residuals.safetensors").read_bytes()
    assert main([*argv, "--resume", "--batch-size", "2"]) == 2
    assert "no checkpoint and was started with other settings" in capsys.readouterr().err
    assert (run / "residuals.safetensors").read_bytes() == before


def test_checkpoints_are_usable_residual_files(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--base",
                str(conv_base),
                "--images",
                str(photos),
                "--out",
                str(run),
                *TRAIN,
                "--checkpoint-every",
                "1",
            ]
        )
        == 0
    )
    checkpoint = run / "checkpoints" / "step-000001"
    argv = [
        "sample",
        "--base",
        str(conv_base),
        "--residuals",
        str(checkpoint / "residuals.safetensors"),
        "--out",
        str(tmp_path / "img"),
        "--prompt",
        "a V* dog",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    sidecar = json.loads(next((tmp_path / "img").glob("*.json")).read_text())
    assert sidecar["expanded_prompt"] == "a sks dog"  # the checkpoint knows its identifier
    capsys.readouterr()
    assert main(["info", str(run)]) == 0  # a run folder stands for its residuals.safetensors
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_sd1_residuals_are_refused_by_an_sd2_layout(
    conv_base: Path, linear_base: Path, tmp_path: Path
) -> None:
    conv = StableDiffusionPipeline.from_pretrained(conv_base, use_safetensors=True).unet
    add_residuals(conv, ResidualConfig(rank=2))
    path = save_residuals(conv, tmp_path / "r.safetensors")
    linear = StableDiffusionPipeline.from_pretrained(linear_base, use_safetensors=True).unet
    with pytest.raises(ResidualFileError, match="another architecture.*conv.*linear"):
        load_residuals(linear, path)


def test_two_concepts_of_one_class_each_get_their_own_class_word() -> None:
    tokenizer = word_tokenizer("a photo of sks zwx dog and playing with".split())
    concepts = [Concept("sks", "dog", "a"), Concept("zwx", "dog", "b")]
    [plan] = plan_prompts(["a V1* dog playing with a V2* dog"], concepts)
    columns = concept_columns(tokenizer, plan, concepts, require=True)
    ids = tokenizer(plan.expanded).input_ids  # <start> a sks dog playing with a zwx dog <end>
    assert columns[0, : len(ids)].nonzero().flatten().tolist() == [2, 3]
    assert columns[1, : len(ids)].nonzero().flatten().tolist() == [7, 8]
    [alone] = plan_prompts(["a dog called V1*"], concepts[:1])
    assert (
        concept_columns(tokenizer, replace(alone, expanded="a dog with sks"), concepts[:1], True)[0].sum()
        == 2
    )


def test_lag_with_several_concepts_needs_a_placeholder_in_every_prompt() -> None:
    tokenizer = word_tokenizer("a photo of sks zwx dog cat".split())
    concepts = [Concept("sks", "dog", "a"), Concept("zwx", "cat", "b")]
    plans = plan_prompts(["a photo of a dog", "a V1* dog", "a V2* cat"], concepts)
    with pytest.raises(ConfigError, match="has no V1\\*, V2\\*"):
        concept_columns(tokenizer, plans[0], concepts, require=True)
    assert concept_columns(tokenizer, plans[0], concepts, require=False).sum() == 0


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
