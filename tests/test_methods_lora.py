"""LoRA behind the method protocol: what it trains, where it starts, and that diffusers itself loads
its result into a fresh pipeline to the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_unet, tiny_config, unet_inputs
from safetensors.torch import load_file, save_file

from persres.backbones.unet import SD
from persres.core.pipeline import load_pipeline
from persres.errors import InputError
from persres.methods.lora import WEIGHTS, LoRA
from persres.methods.protocol import RESULT, Trainable

METHOD = LoRA()
TARGETS = SD.lora_targets


def prepared(base: Path, rank: int = 4, pipe: object = None) -> tuple[object, Trainable]:
    pipe = pipe or load_pipeline(str(base))
    config = tiny_config(base, Path("unused"), lora_rank=rank)
    return pipe, METHOD.prepare(pipe, config, torch.Generator().manual_seed(0))  # type: ignore[arg-type]


def perturb(trainable: Trainable, seed: int = 1) -> None:
    """Non-zero up factors (they start at zero), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainable.params.items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def expected_count(unet: torch.nn.Module, rank: int) -> int:
    total = 0
    for name, module in unet.named_modules():
        if any(name.endswith(f".{target}") for target in TARGETS):
            assert isinstance(module, torch.nn.Linear)
            total += rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("rank", [4, 3])
def test_prepare_trains_only_the_adapters_of_every_attention_projection(base: Path, rank: int) -> None:
    expected = expected_count(load_pipeline(str(base)).unet, rank)
    pipe, trainable = prepared(base, rank)
    trained = {
        id(p)
        for model in (pipe.unet, pipe.vae, pipe.text_encoder)
        for p in model.parameters()
        if p.requires_grad
    }
    assert trained == {id(p) for p in trainable.params.values()}
    assert trainable.count() == expected > 0
    assert not trainable.text_trainable
    assert all(p.dtype == torch.float32 for p in trainable.params.values())
    assert all(name.endswith((".lora_A.weight", ".lora_B.weight")) for name in trainable.params)
    assert METHOD.training_prompt(tiny_config(base, Path("unused"))) == "a photo of a sks dog"


def test_starts_exactly_at_the_base_model(base: Path) -> None:
    pipe = load_pipeline(str(base))
    inputs = unet_inputs(pipe.unet)
    before = run_unet(pipe.unet, inputs)
    pipe, trainable = prepared(base, pipe=pipe)
    assert any(p.abs().sum() > 0 for n, p in trainable.params.items() if ".lora_A." in n)
    assert torch.equal(run_unet(pipe.unet, inputs), before)


def test_init_is_drawn_from_the_run_generator(conv_base: Path) -> None:
    _, first = prepared(conv_base)
    _, second = prepared(conv_base)
    for name, param in first.params.items():
        assert torch.equal(param, second.params[name]), name


def images(pipe: object, prompt: str) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")  # type: ignore[operator]
    return out.images


def test_diffusers_loads_the_saved_lora_to_the_same_outputs(base: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(base))
    inputs = unet_inputs(pipe.unet)
    base_out = run_unet(pipe.unet, inputs)
    pipe, trainable = prepared(base, pipe=pipe)
    perturb(trainable)
    metadata = {"token": "sks", "class_word": "dog", "base_model": str(base), "step": "7"}
    written = METHOD.save(pipe, trainable, tmp_path, metadata)  # type: ignore[arg-type]
    assert written == tmp_path / RESULT / WEIGHTS and written.is_file()

    fresh = load_pipeline(str(base))
    fresh.load_lora_weights(str(tmp_path / RESULT))  # diffusers alone, no persres code
    trained_out = run_unet(pipe.unet, inputs)
    assert not torch.equal(trained_out, base_out)
    assert (run_unet(fresh.unet, inputs) - trained_out).abs().max() <= 1e-5
    prompt = "a photo of a sks dog"
    assert np.abs(images(fresh, prompt) - images(pipe, prompt)).max() <= 1 / 255


def test_load_returns_the_concept_and_the_same_unet(conv_base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(trainable)
    file = METHOD.save(pipe, trainable, tmp_path, {"token": "sks", "class_word": "dog", "step": "3"})
    fresh = load_pipeline(str(conv_base))
    concept = METHOD.load(fresh, tmp_path / RESULT)
    assert (concept.token, concept.class_word, concept.source) == ("sks", "dog", str(file))
    inputs = unet_inputs(pipe.unet)
    assert (run_unet(fresh.unet, inputs) - run_unet(pipe.unet, inputs)).abs().max() <= 1e-5
    assert METHOD.load(load_pipeline(str(conv_base)), file).token == "sks"  # the file itself too


def test_state_round_trip_is_exact(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    perturb(trainable)
    saved = {name: p.detach().clone() for name, p in trainable.params.items()}
    METHOD.save_state(trainable, tmp_path / "state.safetensors", {"step": "5"})
    perturb(trainable, seed=2)
    METHOD.load_state(trainable, tmp_path / "state.safetensors")
    for name, param in trainable.params.items():
        assert torch.equal(param, saved[name]), name


def test_damaged_state_is_refused_naming_file_and_tensor(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    file = tmp_path / "state.safetensors"
    METHOD.save_state(trainable, file, {})
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(file))
    with pytest.raises(InputError, match=rf"{file}.*{name}.*shape"):
        METHOD.load_state(trainable, file)
    del tensors[name]
    save_file(tensors, str(file))
    with pytest.raises(InputError, match=rf"{file}.*missing tensors \['{name}'\]"):
        METHOD.load_state(trainable, file)
    file.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=str(file)):
        METHOD.load_state(trainable, file)


def test_a_rank_above_the_narrowest_layer_is_refused_before_anything_is_written(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import train_argv

    from persres.cli import main

    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--method", "lora", "--rank", "33")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rank 33 is above the width 32 of layer" in err, err
    assert not run.exists()
