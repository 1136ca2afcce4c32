"""The method registry: names map to modules that implement the protocol."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import diffusers_image, tiny_config, train_argv
from PIL import Image
from safetensors.torch import load_file

from persres.cli import main
from persres.config import METHOD_OPTIONS
from persres.errors import ConfigError
from persres.methods import all_methods, get_method
from persres.methods.protocol import RESULT, Recipe
from persres.testing.tiny import save_tiny_pipeline


def test_registry_names_match_the_methods() -> None:
    methods = all_methods()
    assert {"residuals", "lora", "textual-inversion"} <= set(methods) <= set(METHOD_OPTIONS)
    for name, method in methods.items():
        assert method.name == name
        assert get_method(name) is method
        assert isinstance(method.recipe, Recipe) and method.recipe.source
        assert method.options == METHOD_OPTIONS[name]  # what the CLI accepts for it


def test_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; choose one of .*lora.*residuals"):
        get_method("lorra")


def load_with_diffusers(method: str, base: Path, result: Path) -> StableDiffusionPipeline:
    """The diffusers call each method's format is made for, into a fresh pipeline; no persres code."""
    if method == "dreambooth":
        return StableDiffusionPipeline.from_pretrained(result, use_safetensors=True, safety_checker=None)
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True, safety_checker=None)
    if method == "lora":
        pipe.load_lora_weights(str(result))
    else:  # textual-inversion
        pipe.load_textual_inversion(str(result / "learned_embeds.safetensors"))
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "token"), [("lora", "sks"), ("textual-inversion", "<sks>"), ("dreambooth", "sks")]
)
def test_a_trained_run_samples_as_plain_diffusers_loads_it(
    method: str, token: str, conv_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))  # dreambooth's class images
    run = tmp_path / "run"
    extra = ["--prior-images", "2"] if method == "dreambooth" else []
    argv = train_argv(conv_base, photos, run, "--method", method, "--lr", "0.01", *extra)
    assert main(argv) == 0
    images = tmp_path / "images"
    sample = ["sample", "--base", str(conv_base), "--residuals", str(run), "--out", str(images)]
    assert main([*sample, "--prompt", "a photo of a V* dog", "--steps", "2", "--device", "cpu"]) == 0
    [png] = images.glob("*.png")
    assert json.loads(png.with_suffix(".json").read_text())["expanded_prompt"] == f"a photo of a {token} dog"
    ours = np.asarray(Image.open(png), dtype=np.int16)
    theirs = diffusers_image(
        load_with_diffusers(method, conv_base, run / RESULT), f"a photo of a {token} dog"
    )
    assert np.abs(ours - theirs).max() <= 1  # 1/255 per pixel
    base_image = diffusers_image(
        StableDiffusionPipeline.from_pretrained(conv_base, safety_checker=None), f"a photo of a {token} dog"
    )
    assert np.abs(ours - base_image).max() > 1  # training changed something


def result_tensors(result: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run's result holds (a file, or every safetensors file in its folder)."""
    files = sorted(result.rglob("*.safetensors")) if result.is_dir() else [result]
    return {f"{f.relative_to(result) if result.is_dir() else f.name}:{k}": v
            for f in files for k, v in load_file(f).items()}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_an_extended_run_rewrites_its_result_as_one_trained_that_long(
    method: str, conv_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --resume with more steps continues a finished run; folder results (DreamBooth's pipeline, Custom
    # Diffusion's processors) were once refused as "already exists" at the end of the extension
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))
    prior = ["--prior-images", "1"] if "prior_images" in METHOD_OPTIONS[method] else []
    flags = ["--method", method, "--checkpoint-every", "1", *prior]
    extended, direct = tmp_path / "extended", tmp_path / "direct"
    assert main(train_argv(conv_base, photos, extended, *flags, "--steps", "1")) == 0
    first = result_tensors(next((extended).glob("*.safetensors"), extended / RESULT))
    assert main(train_argv(conv_base, photos, extended, *flags, "--steps", "2", "--resume")) == 0
    assert main(train_argv(conv_base, photos, direct, *flags, "--steps", "2")) == 0
    for run in (extended, direct):
        assert not [p.name for p in run.iterdir() if p.name.endswith((".old", ".tmp"))]
    result = next(extended.glob("*.safetensors"), extended / RESULT)
    ours, theirs = result_tensors(result), result_tensors(next(direct.glob("*.safetensors"), direct / RESULT))
    assert ours.keys() == theirs.keys() == first.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(ours[k], first[k]) for k in ours)  # the second step is in it


def test_lag_and_several_concepts_are_for_residuals_runs(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--method", "lora", "--steps", "1")) == 0
    capsys.readouterr()
    sample = ["sample", "--base", str(conv_base), "--residuals", str(run), "--out", str(tmp_path / "o")]
    assert main([*sample, "--prompt", "a V* dog", "--sampler", "lag"]) == 2
    assert "--sampler lag applies to residuals only" in capsys.readouterr().err
    assert main([*sample, "--residuals", str(run), "--prompt", "a V1* dog"]) == 2
    assert "several concepts in one image need residuals runs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("token", ["<|endoftext|>", "<|startoftext|>"])
def test_a_special_token_is_refused_as_identifier_by_every_method(
    method: str, token: str, conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers 5's add_tokens counts an existing special token as added: the learned methods would
    train over its row (every prompt's padding), and LAG would read the padding positions."""
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--method", method, "--token", token)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "special token" in err and token in err, err
    assert not run.exists()


@pytest.mark.parametrize("method", ["textual-inversion", "perfusion", "custom-diffusion"])
def test_a_method_that_adds_its_token_refuses_one_the_vocabulary_has(method: str, conv_base: Path) -> None:
    from persres.core.pipeline import load_pipeline

    pipe = load_pipeline(str(conv_base))
    config = replace(tiny_config(conv_base, Path("unused")), method=method, token="<dog>")
    pipe.tokenizer.add_tokens(["<dog>"])  # e.g. a pipeline that another concept was loaded into
    with pytest.raises(ConfigError, match="already has the token '<dog>'"):
        get_method(method).prepare(pipe, config, torch.Generator())


@pytest.fixture(scope="module")
def wider_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.x layout like conv_base (same architecture record), other block widths."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny-wider", widths=(32, 48))


@pytest.fixture(scope="module")
def runs(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run of every method on conv_base (SD 1.x layout)."""
    root = tmp_path_factory.mktemp("runs")
    os.environ["PERSRES_CACHE"] = str(root / "cache")  # class images; the tests' own cache
    found = {}
    for method in sorted(METHOD_OPTIONS):
        extra = ["--prior-images", "1"] if "prior_images" in METHOD_OPTIONS[method] else []
        argv = train_argv(conv_base, photos, root / method, "--method", method, *extra)
        assert main([*argv, "--steps", "1"]) == 0, method
        found[method] = root / method
    return found


def sample_error(capsys: pytest.CaptureFixture[str], base: Path, run: Path, out: Path) -> str:
    argv = ["sample", "--base", str(base), "--residuals", str(run), "--out", str(out)]
    assert main([*argv, "--prompt", "a V* dog", "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600, err[:2000]
    assert not out.exists()
    return err


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_every_result_records_its_architecture_and_is_refused_on_another(
    method: str, runs: dict[str, Path], linear_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = sample_error(capsys, linear_base, runs[method], tmp_path / "images")
    assert "was made for SD 1.x (proj_out conv" in err and "this base model is SD 2.x (proj_out linear" in err


@pytest.mark.parametrize("method", ["lora", "dreambooth", "custom-diffusion", "perfusion"])
def test_a_result_on_a_base_of_other_widths_is_refused_in_one_line(
    method: str, runs: dict[str, Path], wider_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The architecture record matches (both SD 1.x layouts): the load itself finds the layer that differs
    (diffusers' own error was 143-212 lines)."""
    err = sample_error(capsys, wider_base, runs[method], tmp_path / "images")
    assert str(runs[method]) in err and "48" in err, err
