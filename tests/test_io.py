"""Residual files: safetensors round trip, strict loading, atomic and non-clobbering writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import randomize_residuals, run_unet, unet_inputs
from safetensors.torch import save_file
from torch import nn

from persres import (
    ResidualConfig,
    add_residuals,
    find_residuals,
    load_residuals,
    read_residual_file,
    remove_residuals,
    save_residuals,
)
from persres.cli import main
from persres.errors import OutputExistsError, ResidualFileError
from persres.formats.info import describe
from persres.testing.tiny import tiny_unet


def test_round_trip_restores_factors_output_and_metadata(unet: nn.Module, tmp_path: Path) -> None:
    inputs = unet_inputs(unet)
    add_residuals(unet)
    randomize_residuals(unet)
    expected = run_unet(unet, inputs)
    path = save_residuals(
        unet, tmp_path / "r.safetensors", token="sks", class_word="dog", rank_config={"rank": 0.05}
    )
    saved = {p: (w.A.detach().clone(), w.B.detach().clone()) for p, w in find_residuals(unet).items()}
    remove_residuals(unet)
    metadata = load_residuals(unet, path)
    assert metadata["token"] == "sks" and metadata["class_word"] == "dog"
    assert metadata["rank_config"] == '{"rank": 0.05}'
    assert metadata["format"] == "persres.residuals" and metadata["format_version"] == "1"
    for path_, wrapper in find_residuals(unet).items():
        assert torch.equal(wrapper.A, saved[path_][0]) and torch.equal(wrapper.B, saved[path_][1])
    assert torch.equal(run_unet(unet, inputs), expected)
    assert sorted(read_residual_file(path).tensors) == sorted(f"{p}.{f}" for p in saved for f in "AB")


def test_load_into_existing_wrappers_of_the_same_rank(unet: nn.Module, tmp_path: Path) -> None:
    add_residuals(unet)
    randomize_residuals(unet, seed=3)
    path = save_residuals(unet, tmp_path / "r.safetensors")
    wanted = {p: w.A.detach().clone() for p, w in find_residuals(unet).items()}
    randomize_residuals(unet, seed=4)
    load_residuals(unet, path)
    assert all(torch.equal(w.A, wanted[p]) for p, w in find_residuals(unet).items())


def test_rank_mismatch_with_existing_wrappers_names_the_layer(unet: nn.Module, tmp_path: Path) -> None:
    add_residuals(unet, ResidualConfig(rank=2))
    path = save_residuals(unet, tmp_path / "r.safetensors")
    remove_residuals(unet)
    add_residuals(unet, ResidualConfig(rank=3))
    with pytest.raises(
        ResidualFileError, match=r"down_blocks.0.attentions.0.proj_out has rank 2 in the file but 3"
    ):
        load_residuals(unet, path)


def test_other_architecture_names_layer_and_both_shapes(tmp_path: Path) -> None:
    small = tiny_unet()
    add_residuals(small, ResidualConfig(rank=2))
    path = save_residuals(small, tmp_path / "r.safetensors", base_model="tiny")
    other = tiny_unet(widths=(48, 64))
    with pytest.raises(ResidualFileError) as err:
        load_residuals(other, path)
    message = str(err.value)
    assert "down_blocks.0.attentions.0.proj_out does not fit" in message
    assert "(32, 2)" in message and "(48, 48, 1, 1)" in message
    assert not find_residuals(other)  # nothing half-loaded


def test_missing_and_extra_layers_are_named(tmp_path: Path) -> None:
    unet = tiny_unet()
    add_residuals(unet)
    path = save_residuals(unet, tmp_path / "r.safetensors")
    tensors = dict(read_residual_file(path).tensors)
    metadata = read_residual_file(path).metadata
    tensors.pop("mid_block.attentions.0.proj_out.A")
    tensors.pop("mid_block.attentions.0.proj_out.B")
    tensors["up_blocks.7.attentions.0.proj_out.A"] = torch.zeros(32, 2)
    tensors["up_blocks.7.attentions.0.proj_out.B"] = torch.zeros(2, 32)
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    remove_residuals(unet)
    with pytest.raises(ResidualFileError) as err:
        load_residuals(unet, tmp_path / "edited.safetensors")
    assert "up_blocks.7.attentions.0.proj_out" in str(err.value)
    assert "mid_block.attentions.0.proj_out" in str(err.value)


def test_a_factor_missing_or_an_unknown_tensor_is_named(tmp_path: Path) -> None:
    meta = {"format": "persres.residuals", "format_version": "1"}
    save_file({"x.proj_out.A": torch.zeros(4, 1)}, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(ResidualFileError, match=r"x.proj_out lacks factor\(s\) \['B'\]"):
        read_residual_file(tmp_path / "half.safetensors")
    save_file({"x.proj_out.lora_up": torch.zeros(4, 1)}, str(tmp_path / "odd.safetensors"), metadata=meta)
    with pytest.raises(ResidualFileError, match="unexpected tensor 'x.proj_out.lora_up'"):
        read_residual_file(tmp_path / "odd.safetensors")


def test_not_safetensors_wrong_format_and_newer_version_are_refused(tmp_path: Path) -> None:
    pickle_like = tmp_path / "model.bin"
    pickle_like.write_bytes(b"\x80\x04\x95 not a safetensors file")
    with pytest.raises(ResidualFileError, match="model.bin is not a safetensors file"):
        read_residual_file(pickle_like)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ResidualFileError, match="not a persres residual file"):
        read_residual_file(tmp_path / "other.safetensors")
    save_file(
        {"w.A": torch.zeros(2, 1), "w.B": torch.zeros(1, 2)},
        str(tmp_path / "new.safetensors"),
        metadata={"format": "persres.residuals", "format_version": "99"},
    )
    with pytest.raises(ResidualFileError, match="format version 99"):
        read_residual_file(tmp_path / "new.safetensors")
    with pytest.raises(ResidualFileError, match="not found"):
        read_residual_file(tmp_path / "absent.safetensors")


def test_save_never_overwrites_silently_and_leaves_no_temp_files(tmp_path: Path) -> None:
    unet = tiny_unet()
    add_residuals(unet)
    path = save_residuals(unet, tmp_path / "r.safetensors")
    before = path.read_bytes()
    randomize_residuals(unet)
    with pytest.raises(OutputExistsError, match="already exists"):
        save_residuals(unet, path)
    assert path.read_bytes() == before
    save_residuals(unet, path, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_loading_into_a_pipeline_from_pretrained(conv_base: Path, tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(conv_base, use_safetensors=True)
    add_residuals(pipe.unet)
    randomize_residuals(pipe.unet)
    path = save_residuals(pipe.unet, tmp_path / "r.safetensors")
    fresh = StableDiffusionPipeline.from_pretrained(conv_base, use_safetensors=True)
    load_residuals(fresh.unet, path)
    inputs = unet_inputs(fresh.unet)
    assert torch.equal(run_unet(fresh.unet, inputs), run_unet(pipe.unet, inputs))


def saved_factors(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a valid residual file (tiny U-Net, rank 2), to edit."""
    unet = tiny_unet()
    add_residuals(unet, ResidualConfig(rank=2))
    randomize_residuals(unet)
    path = save_residuals(unet, tmp_path / "valid.safetensors", token="sks", class_word="dog", step=5)
    loaded = read_residual_file(path)
    return dict(loaded.tensors), dict(loaded.metadata)


def write_edited(
    tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "edited"
) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


LAYER = "mid_block.attentions.0.proj_out"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_factors_that_are_not_finite_are_refused(tmp_path: Path, bad: float) -> None:
    tensors, metadata = saved_factors(tmp_path)
    tensors[f"{LAYER}.B"][1, 3] = bad
    path = write_edited(tmp_path, tensors, metadata)
    match = rf"{LAYER} has NaN or infinite values in factor B: the training run that wrote it diverged"
    with pytest.raises(ResidualFileError, match=match) as err:
        read_residual_file(path)
    assert "earlier checkpoint" in str(err.value) and str(path) in str(err.value)
    unet = tiny_unet()
    with pytest.raises(ResidualFileError, match=match):
        load_residuals(unet, path)
    assert not find_residuals(unet)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_factors_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors, metadata = saved_factors(tmp_path)
    tensors[f"{LAYER}.A"] = tensors[f"{LAYER}.A"].to(dtype)
    path = write_edited(tmp_path, tensors, metadata)
    name = {torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}[dtype]
    with pytest.raises(ResidualFileError, match=rf"tensor '{LAYER}.A' has dtype {name}; .* floating point"):
        read_residual_file(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_factors_of_any_precision_load_as_fp32(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors, metadata = saved_factors(tmp_path)
    path = write_edited(tmp_path, {k: v.to(dtype) for k, v in tensors.items()}, metadata)
    loaded = read_residual_file(path)
    for key, tensor in loaded.tensors.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, tensors[key].to(dtype).float())
    unet = tiny_unet()
    load_residuals(unet, path)
    assert torch.equal(find_residuals(unet)[LAYER].A, tensors[f"{LAYER}.A"].to(dtype).float())


DAMAGED_METADATA = {
    "architecture-not-json": ({"architecture": "{proj_out: conv"}, r"architecture is not valid JSON"),
    "architecture-not-object": ({"architecture": "[1, 2]"}, r"architecture is '\[1, 2\]', not a JSON"),
    "rank-config-not-json": ({"rank_config": "rank=0.05"}, r"metadata rank_config is not valid JSON"),
    "train-config-not-json": ({"train_config": "{"}, r"metadata train_config is not valid JSON"),
    "step-not-integer": ({"step": "12.5"}, r"metadata step is '12.5', not an integer"),
    "step-negative": ({"step": "-3"}, r"metadata step is '-3', not an integer"),
    "version-not-integer": ({"format_version": "1.0"}, r"metadata format_version is '1.0', not an integer"),
    "version-word": ({"format_version": "one"}, r"metadata format_version is 'one', not an integer"),
    "version-missing": ({"format_version": None}, r"records no format_version"),
    "version-zero": ({"format_version": "0"}, r"has format version 0; this persres reads version 1"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_METADATA))
def test_damaged_metadata_is_named(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    tensors, metadata = saved_factors(tmp_path)
    change, match = DAMAGED_METADATA[case]
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    path = write_edited(tmp_path, tensors, metadata)
    with pytest.raises(ResidualFileError, match=match) as err:
        read_residual_file(path)
    assert str(path) in str(err.value)
    with pytest.raises(ResidualFileError, match=match):
        describe(path)
    with pytest.raises(ResidualFileError, match=match):
        load_residuals(tiny_unet(), path)
    assert main(["info", str(path)]) == 2
    assert "persres info: error:" in capsys.readouterr().err


DAMAGED_SHAPES = {
    "rank-mismatch": (lambda a, b: (a, b[:1]), r"has A \[64, 2\] and B \[1, 64\]; A \(m, r\) and B \(r, m\)"),
    "rank-zero": (lambda a, b: (a[:, :0], b[:0]), r"has A \[64, 0\] and B \[0, 64\]; .* rank r >= 1"),
    "one-dimensional": (lambda a, b: (a[:, 0], b), rf"'{LAYER}.A' has shape \[64\]; .* matrices"),
    "three-dimensional": (lambda a, b: (a, b[None]), rf"'{LAYER}.B' has shape \[1, 2, 64\]; .* matrices"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_SHAPES))
def test_factors_of_the_wrong_rank_or_dimension_are_named(tmp_path: Path, case: str) -> None:
    tensors, metadata = saved_factors(tmp_path)
    edit, match = DAMAGED_SHAPES[case]
    tensors[f"{LAYER}.A"], tensors[f"{LAYER}.B"] = edit(tensors[f"{LAYER}.A"], tensors[f"{LAYER}.B"])
    path = write_edited(tmp_path, {k: v.contiguous() for k, v in tensors.items()}, metadata)
    for read in (read_residual_file, describe):
        with pytest.raises(ResidualFileError, match=match):
            read(path)


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    tensors, metadata = saved_factors(tmp_path)
    path = write_edited(tmp_path, tensors, metadata)
    path.write_bytes(path.read_bytes()[:-10])
    for read in (read_residual_file, describe):
        with pytest.raises(ResidualFileError, match="is not a safetensors file .*tensor data"):
            read(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ResidualFileError, match="is not a safetensors file"):
        describe(path)


def test_a_non_finite_file_stops_merge_before_anything_is_written(
    conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unet = tiny_unet()
    add_residuals(unet)
    randomize_residuals(unet)
    with torch.no_grad():
        find_residuals(unet)[LAYER].A[0, 0] = float("nan")
    path = save_residuals(unet, tmp_path / "r.safetensors", token="sks", class_word="dog")
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(conv_base), "--residuals", str(path), "--out", str(out)]) == 2
    assert f"{LAYER} has NaN or infinite values in factor A" in capsys.readouterr().err
    assert not out.exists()


def test_sd1_residuals_are_refused_by_an_sd2_layout(
    conv_base: Path, linear_base: Path, tmp_path: Path
) -> None:
    conv = StableDiffusionPipeline.from_pretrained(conv_base, use_safetensors=True).unet
    add_residuals(conv, ResidualConfig(rank=2))
    path = save_residuals(conv, tmp_path / "r.safetensors")
    linear = StableDiffusionPipeline.from_pretrained(linear_base, use_safetensors=True).unet
    names = r"made for SD 1.x \(proj_out conv.*this base model is SD 2.x \(proj_out linear"
    with pytest.raises(ResidualFileError, match=names):
        load_residuals(linear, path)
