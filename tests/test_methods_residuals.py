"""The residual method behind the protocol writes and reads the residual file unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_unet, tiny_config, unet_inputs
from safetensors.torch import load_file, save_file

from persres.config import ResidualConfig
from persres.core.pipeline import load_pipeline
from persres.core.residuals import find_residuals, residual_parameters
from persres.errors import ResidualFileError
from persres.formats.concepts import load_concepts
from persres.formats.io import read_residual_file
from persres.methods.protocol import Trainable
from persres.methods.residuals import Residuals

METHOD = Residuals()
METADATA = {"token": "sks", "class_word": "dog", "base_model": "tiny", "step": "4"}


def prepared(base: Path, **changes: object) -> tuple[object, Trainable]:
    pipe = load_pipeline(str(base))
    trainable = METHOD.prepare(
        pipe, tiny_config(base, Path("unused"), **changes), torch.Generator().manual_seed(0)
    )
    return pipe, trainable


def perturb(trainable: Trainable, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable.params.values():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_prepare_trains_the_residual_factors_only(base: Path) -> None:
    pipe, trainable = prepared(base, residual=ResidualConfig(rank=2))
    assert trainable.params.keys() == residual_parameters(pipe.unet).keys()
    assert all(key.endswith((".A", ".B")) for key in trainable.params)
    trained = {
        id(p) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if p.requires_grad
    }
    assert trained == {id(p) for p in trainable.params.values()}
    assert all(w.rank == 2 for w in find_residuals(pipe.unet).values())
    assert not trainable.text_trainable
    assert METHOD.recipe.steps == 150 and METHOD.recipe.lr == 1e-3 and METHOD.recipe.batch_size == 4


def test_saved_result_is_a_residual_file_that_load_concepts_reads_alike(base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(base)
    perturb(trainable)
    path = METHOD.save(pipe, trainable, tmp_path, METADATA)  # type: ignore[arg-type]
    assert path == tmp_path / "residuals.safetensors"
    loaded = read_residual_file(path)
    assert {k: loaded.metadata[k] for k in METADATA} == METADATA
    assert "architecture" in loaded.metadata
    for key, param in trainable.params.items():
        assert torch.equal(loaded.tensors[key], param.detach()), key

    ours, theirs = load_pipeline(str(base)), load_pipeline(str(base))
    concept = METHOD.load(ours, tmp_path)  # type: ignore[arg-type]
    (expected,) = load_concepts(theirs.unet, [path])
    assert concept == expected and (concept.token, concept.class_word) == ("sks", "dog")
    inputs = unet_inputs(ours.unet)
    assert torch.equal(run_unet(ours.unet, inputs), run_unet(theirs.unet, inputs))
    assert torch.equal(run_unet(ours.unet, inputs), run_unet(pipe.unet, inputs))


def test_state_round_trip_is_exact_and_a_residual_file(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    perturb(trainable)
    saved = {k: p.detach().clone() for k, p in trainable.params.items()}
    file = tmp_path / "state.safetensors"
    METHOD.save_state(trainable, file, METADATA)
    assert read_residual_file(file).metadata["step"] == "4"
    perturb(trainable, seed=2)
    METHOD.load_state(trainable, file)
    for key, param in trainable.params.items():
        assert torch.equal(param, saved[key]), key


def test_mis_shaped_state_is_refused_naming_file_and_layer(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    file = tmp_path / "state.safetensors"
    METHOD.save_state(trainable, file, METADATA)
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    layer = key.rpartition(".")[0]
    a, b = tensors[f"{layer}.A"], tensors[f"{layer}.B"]
    tensors[f"{layer}.A"], tensors[f"{layer}.B"] = (
        torch.zeros(a.shape[0], a.shape[1] + 1),
        torch.zeros(b.shape[0] + 1, b.shape[1]),
    )
    save_file(tensors, str(file), metadata={"format": "persres.residuals", "format_version": "1"})
    with pytest.raises(ResidualFileError, match=rf"{file}: layer {layer} has rank"):
        METHOD.load_state(trainable, file)
