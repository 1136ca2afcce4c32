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
from persres.errors import OutputExistsError, ResidualFileError
from persres.tiny import tiny_unet


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
