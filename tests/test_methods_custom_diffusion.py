"""Custom Diffusion as a persres method: cross-attention K/V and the modifier token train, nothing else;
diffusers' own loaders read what it saves. These tests name the token <new1>, the authors' (--token new1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import tiny_config, unet_inputs
from safetensors.torch import load_file, save_file

from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError, InputError
from persres.methods.concept_json import CONCEPT_FILE
from persres.methods.custom_diffusion import CUSTOM_DIFFUSION, EMBEDDING, MODIFIER, TOKEN_PARAM, WEIGHTS
from persres.methods.patches import unpatch
from persres.methods.protocol import Trainable
from persres.testing.tiny import BASIC_WORDS, tiny_pipeline

METADATA = {"base_model": "tiny", "token": "sks", "class_word": "dog", "step": "6"}
PROMPT = f"photo of a {MODIFIER} dog"


@pytest.fixture(scope="module")
def ktn_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base whose vocabulary has the authors' initializer token "ktn" as one token."""
    folder = tmp_path_factory.mktemp("base") / "tiny-ktn"
    tiny_pipeline(words=(*BASIC_WORDS, "ktn")).save_pretrained(folder, safe_serialization=True)
    return folder


def prepared(base: Path, photos: Path) -> tuple[StableDiffusionPipeline, Trainable]:
    pipe = load_pipeline(str(base))
    config = tiny_config(base, photos, token="new1")
    return pipe, CUSTOM_DIFFUSION.prepare(pipe, config, torch.Generator().manual_seed(0))


def perturb(pipe: StableDiffusionPipeline, trainable: Trainable, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable.params.values():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    CUSTOM_DIFFUSION.after_step(pipe, trainable)


def embed(pipe: StableDiffusionPipeline, prompt: str = PROMPT) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids)[0]


def unet_output(pipe: StableDiffusionPipeline, prompt: str = PROMPT) -> torch.Tensor:
    latents, steps, _ = unet_inputs(pipe.unet, batch=1)
    with torch.no_grad():
        return pipe.unet(latents, steps, encoder_hidden_states=embed(pipe, prompt)).sample


def image(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(3)
    return pipe(PROMPT, num_inference_steps=2, height=16, width=16, generator=generator,
                output_type="np").images[0]  # fmt: skip


def test_recipe_and_prompt(conv_base: Path, photos: Path):
    prompt = CUSTOM_DIFFUSION.training_prompt(tiny_config(conv_base, photos, token="new1"))
    assert prompt == "photo of a <new1> dog"
    assert CUSTOM_DIFFUSION.identifier(tiny_config(conv_base, photos)) == "<sks>"  # --token, as the others
    recipe = CUSTOM_DIFFUSION.recipe
    assert (recipe.lr, recipe.batch_size, recipe.steps, recipe.prior_images, recipe.prior_weight) == (
        4e-5,
        2,
        250,
        200,
        1.0,
    )
    assert "examples/custom_diffusion" in recipe.source and "LAION" in recipe.source


def test_prepare_trains_cross_attention_kv_and_the_token_only(ktn_base: Path, photos: Path):
    pipe, trainable = prepared(ktn_base, photos)
    assert trainable.text_trainable
    models = (pipe.unet, pipe.text_encoder, pipe.vae)
    trained = {id(p) for model in models for p in model.parameters() if p.requires_grad}
    assert trained | {id(trainable.params[TOKEN_PARAM])} == {id(p) for p in trainable.params.values()}
    cross = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert len(cross) == 4
    width = pipe.text_encoder.config.hidden_size
    assert trainable.count() == sum(2 * m.to_k.weight.numel() for m in cross) + width
    keys = {k for k in trainable.params if k != TOKEN_PARAM}
    assert all(".attn2.processor.to_" in k and "_custom_diffusion.weight" in k for k in keys)
    assert len(pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids) == 5  # <new1> is one token
    weight = pipe.text_encoder.get_input_embeddings().weight
    ktn = pipe.tokenizer.convert_tokens_to_ids("ktn</w>")
    assert torch.equal(trainable.params[TOKEN_PARAM], weight[ktn])  # started from "ktn"
    base = load_pipeline(str(ktn_base))
    plain = "a photo of a dog"  # K/V start as copies of the layers' own: the base's output
    assert torch.allclose(unet_output(pipe, plain), unet_output(base, plain), atol=1e-6)


def test_after_step_keeps_every_other_embedding_row(ktn_base: Path, photos: Path):
    pipe, trainable = prepared(ktn_base, photos)
    weight = pipe.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    new_id = pipe.tokenizer.convert_tokens_to_ids(MODIFIER)
    start = trainable.params[TOKEN_PARAM].detach().clone()
    optimizer = torch.optim.AdamW(trainable.params.values(), lr=1e-2, weight_decay=1e-2)
    for _ in range(2):
        latents, steps, _ = unet_inputs(pipe.unet, batch=1)
        loss = pipe.unet(latents, steps, encoder_hidden_states=embed(pipe)).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        CUSTOM_DIFFUSION.after_step(pipe, trainable)
    others = torch.arange(len(weight)) != new_id
    assert torch.equal(weight[others], before[others])
    assert not torch.equal(trainable.params[TOKEN_PARAM], start)  # the token learned
    assert torch.equal(weight[new_id], trainable.params[TOKEN_PARAM])


def test_diffusers_loads_what_it_saves(ktn_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(ktn_base, photos)
    perturb(pipe, trainable)
    folder = CUSTOM_DIFFUSION.save(pipe, trainable, tmp_path, METADATA)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, EMBEDDING, CONCEPT_FILE])
    assert json.loads((folder / CONCEPT_FILE).read_text())["token"] == MODIFIER

    fresh = load_pipeline(str(ktn_base))  # the judge: diffusers' own loaders on a fresh base
    weights: dict[str, object] = {**load_file(str(folder / WEIGHTS))}
    empty = {name: {} for name in fresh.unet.attn_processors if name.endswith("attn1.processor")}
    fresh.unet.load_attn_procs({**weights, **empty}, _pipeline=fresh)  # diffusers issue 9320, see load
    fresh.load_textual_inversion(str(folder), weight_name=EMBEDDING, token=MODIFIER)
    assert (unet_output(fresh) - unet_output(pipe)).abs().max() <= 1e-5
    assert np.abs(image(fresh) - image(pipe)).max() <= 1 / 255
    assert (unet_output(fresh) - unet_output(load_pipeline(str(ktn_base)))).abs().max() > 1e-3

    loaded = load_pipeline(str(ktn_base))
    concept = CUSTOM_DIFFUSION.load(loaded, folder)
    assert (concept.token, concept.class_word, concept.source) == (MODIFIER, "dog", str(folder))
    assert torch.equal(unet_output(loaded), unet_output(fresh))


def test_diffusers_documented_load_attn_procs_loads_nothing(ktn_base: Path, photos: Path, tmp_path: Path):
    """Why load passes diffusers its pipeline: the README's call leaves the default processors (0.42.1).
    When this fails, diffusers has fixed issue 9320 and load can use the documented call."""
    pipe, trainable = prepared(ktn_base, photos)
    folder = CUSTOM_DIFFUSION.save(pipe, trainable, tmp_path, METADATA)
    fresh = load_pipeline(str(ktn_base))
    fresh.unet.load_attn_procs(str(folder), weight_name=WEIGHTS)
    assert {type(p).__name__ for p in fresh.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_load_refuses_a_used_pipeline_and_another_base(
    ktn_base: Path, linear_base: Path, photos: Path, tmp_path: Path
):
    pipe, trainable = prepared(ktn_base, photos)
    folder = CUSTOM_DIFFUSION.save(pipe, trainable, tmp_path, METADATA)
    unpatch(pipe)  # else refused as patched (test_methods_patches); the token stays in the tokenizer
    with pytest.raises(ConfigError, match="already has the token"):
        CUSTOM_DIFFUSION.load(pipe, folder)
    wider = tmp_path / "wider"
    tiny_pipeline(widths=(32, 48)).save_pretrained(wider, safe_serialization=True)
    with pytest.raises(
        InputError, match="tensor mid_block.*to_k_custom_diffusion.weight is .* \\(64, 32\\).*\\(48, 32\\)"
    ):
        CUSTOM_DIFFUSION.load(load_pipeline(str(wider)), folder)


def test_initializer_missing_from_the_vocabulary_starts_from_its_pieces(conv_base: Path, photos: Path):
    pipe, trainable = prepared(conv_base, photos)
    pieces = pipe.tokenizer("ktn", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(trainable.params[TOKEN_PARAM], weight[pieces].mean(0))


def test_state_round_trip_is_exact_and_strict(ktn_base: Path, photos: Path, tmp_path: Path):
    pipe, trainable = prepared(ktn_base, photos)
    perturb(pipe, trainable)
    saved = {name: p.detach().clone() for name, p in trainable.params.items()}
    path = tmp_path / "state.safetensors"
    CUSTOM_DIFFUSION.save_state(trainable, path, {"step": "2"})
    perturb(pipe, trainable, seed=2)
    CUSTOM_DIFFUSION.load_state(trainable, path)
    assert all(torch.equal(trainable.params[name], value) for name, value in saved.items())

    tensors = load_file(str(path))
    tensors[TOKEN_PARAM] = torch.full_like(tensors[TOKEN_PARAM], float("nan"))
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged))
    with pytest.raises(InputError, match=f"{damaged}.*tensor text_encoder.token_embedding.<new1> holds NaN"):
        CUSTOM_DIFFUSION.load_state(trainable, damaged)
    assert all(torch.equal(trainable.params[name], value) for name, value in saved.items())  # untouched


def test_the_token_is_honoured_and_sampling_uses_the_recorded_one(
    ktn_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--token was silently ignored (always <new1>)."""
    from helpers import train_argv

    from persres.cli import main

    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))  # the class images
    run, images = tmp_path / "run", tmp_path / "images"
    method = ("--method", "custom-diffusion", "--token", "zq", "--prior-images", "1")
    argv = train_argv(ktn_base, photos, run, *method)
    assert main(argv) == 0
    folder = run / "result"
    assert json.loads((folder / CONCEPT_FILE).read_text())["token"] == "<zq>"
    assert (folder / "<zq>.safetensors").is_file() and not (folder / EMBEDDING).exists()
    sample = ["sample", "--base", str(ktn_base), "--residuals", str(run), "--out", str(images)]
    assert main([*sample, "--prompt", "a photo of a V* dog", "--steps", "1", "--device", "cpu"]) == 0
    [png] = images.glob("*.png")
    assert json.loads(png.with_suffix(".json").read_text())["expanded_prompt"] == "a photo of a <zq> dog"


def test_a_token_that_cannot_name_its_file_is_refused(ktn_base: Path, photos: Path):
    pipe = load_pipeline(str(ktn_base))
    with pytest.raises(ConfigError, match="`token` '<a/b>' names Custom Diffusion's embedding file"):
        CUSTOM_DIFFUSION.prepare(pipe, tiny_config(ktn_base, photos, token="a/b"), torch.Generator())
