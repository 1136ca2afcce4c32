"""DreamBooth as a persres method: what it trains, and that diffusers itself loads what it saves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from helpers import tiny_config, unet_inputs
from safetensors.torch import load_file, save_file

from persres.core.pipeline import load_pipeline
from persres.errors import InputError
from persres.methods.concept_json import CONCEPT_FILE
from persres.methods.dreambooth import DREAMBOOTH

METADATA = {"base_model": "tiny", "token": "sks", "class_word": "dog", "step": "6"}


def prepared(base: Path, photos: Path) -> tuple[StableDiffusionPipeline, object]:
    pipe = load_pipeline(str(base))
    return pipe, DREAMBOOTH.prepare(pipe, tiny_config(base, photos), torch.Generator().manual_seed(0))


def perturb(params: dict[str, torch.nn.Parameter], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params.values():
            param.add_(torch.randn(param.shape, generator=g) * 0.02)


def unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    latents, steps, text = unet_inputs(pipe.unet)
    with torch.no_grad():
        return pipe.unet(latents, steps, encoder_hidden_states=text).sample


def image(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    return pipe("a photo of a sks dog", num_inference_steps=2, height=16, width=16, generator=generator,
                output_type="np").images[0]  # fmt: skip


def test_recipe_and_prompt(conv_base: Path, photos: Path):
    assert DREAMBOOTH.training_prompt(tiny_config(conv_base, photos)) == "a photo of a sks dog"
    recipe = DREAMBOOTH.recipe
    assert (recipe.lr, recipe.batch_size, recipe.steps, recipe.prior_images, recipe.prior_weight) == (
        5e-6,
        1,
        800,
        200,
        1.0,
    )
    assert "examples/dreambooth" in recipe.source
    assert DREAMBOOTH.options == frozenset({"prior_images", "prior_weight"})


def test_prepare_trains_the_whole_unet_only(conv_base: Path, photos: Path):
    pipe, trainable = prepared(conv_base, photos)
    params = trainable.params  # type: ignore[attr-defined]
    assert set(params) == {name for name, _ in pipe.unet.named_parameters()}
    assert trainable.count() == sum(p.numel() for p in pipe.unet.parameters())  # type: ignore[attr-defined]
    assert not trainable.text_trainable  # type: ignore[attr-defined]
    everything = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]
    assert {id(p) for p in everything if p.requires_grad} == {id(p) for p in params.values()}


def test_saved_pipeline_loads_in_plain_diffusers(conv_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(conv_base, photos)
    perturb(trainable.params)  # type: ignore[attr-defined]
    folder = DREAMBOOTH.save(pipe, trainable, tmp_path, METADATA)  # type: ignore[arg-type]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / CONCEPT_FILE).read_text())["method"] == "dreambooth"
    assert not [p for p in folder.rglob("*.bin")]

    fresh = StableDiffusionPipeline.from_pretrained(folder)  # the judge: diffusers alone
    assert type(fresh.scheduler).__name__ == "PNDMScheduler"  # as the base ships it
    assert (unet_output(fresh) - unet_output(pipe)).abs().max() <= 1e-5
    fresh.scheduler = DDIMScheduler.from_config(fresh.scheduler.config, clip_sample=False)  # persres' sampler
    assert np.abs(image(fresh) - image(pipe)).max() <= 1 / 255


def test_load_copies_the_unet_into_a_fresh_base(conv_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(conv_base, photos)
    perturb(trainable.params)  # type: ignore[attr-defined]
    folder = DREAMBOOTH.save(pipe, trainable, tmp_path, METADATA)  # type: ignore[arg-type]
    base = load_pipeline(str(conv_base))
    assert (unet_output(base) - unet_output(pipe)).abs().max() > 1e-3  # the perturbation shows
    concept = DREAMBOOTH.load(base, folder)
    assert (concept.token, concept.class_word, concept.source) == ("sks", "dog", str(folder))
    assert torch.equal(unet_output(base), unet_output(pipe))


def test_load_refuses_another_architecture(conv_base: Path, linear_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(conv_base, photos)
    folder = DREAMBOOTH.save(pipe, trainable, tmp_path, METADATA)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="does not fit"):
        DREAMBOOTH.load(load_pipeline(str(linear_base)), folder)


def test_state_round_trip_is_exact_and_strict(conv_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(conv_base, photos)
    params = trainable.params  # type: ignore[attr-defined]
    perturb(params)
    saved = {name: p.detach().clone() for name, p in params.items()}
    path = tmp_path / "state.safetensors"
    DREAMBOOTH.save_state(trainable, path, {"step": "2"})  # type: ignore[arg-type]
    perturb(params, seed=2)
    DREAMBOOTH.load_state(trainable, path)  # type: ignore[arg-type]
    assert all(torch.equal(params[name], value) for name, value in saved.items())

    tensors = load_file(str(path))
    name = "conv_in.weight"
    tensors[name] = tensors[name][:1]
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged))
    with pytest.raises(InputError, match=f"{damaged}.*tensor {name} is"):
        DREAMBOOTH.load_state(trainable, damaged)  # type: ignore[arg-type]
    del tensors[name]
    save_file(tensors, str(damaged))
    with pytest.raises(InputError, match=f"{damaged}.*missing tensors \\['{name}'\\]"):
        DREAMBOOTH.load_state(trainable, damaged)  # type: ignore[arg-type]
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match=f"{damaged}.*not a readable safetensors"):
        DREAMBOOTH.load_state(trainable, damaged)  # type: ignore[arg-type]
