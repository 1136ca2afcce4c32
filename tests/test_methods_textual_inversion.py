"""Textual Inversion behind the method protocol: one new embedding row trained, every other row kept,
and diffusers itself loads the result into a fresh pipeline to the same prompt embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from safetensors.torch import save_file

from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError, InputError
from persres.methods.patches import unpatch
from persres.methods.protocol import RESULT, Trainable
from persres.methods.textual_inversion import WEIGHTS, TextualInversion, placeholder

METHOD = TextualInversion()
TOKEN = "<sks>"
PROMPT = f"a photo of a {TOKEN} dog"


def prepared(base: Path, **changes: object) -> tuple[object, Trainable]:
    pipe = load_pipeline(str(base))
    config = tiny_config(base, Path("unused"), **changes)
    return pipe, METHOD.prepare(pipe, config, torch.Generator().manual_seed(0))


def new_row(pipe: object, trainable: Trainable) -> torch.Tensor:
    row = pipe.tokenizer.convert_tokens_to_ids(TOKEN)  # type: ignore[attr-defined]
    return trainable.params[TOKEN][row]


def perturb(pipe: object, trainable: Trainable, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        row = new_row(pipe, trainable)
        row.add_(torch.randn(row.shape, generator=g))


def encode(pipe: object, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)  # type: ignore[attr-defined]
    return embeds


def test_placeholder_wraps_the_token_once() -> None:
    assert placeholder("sks") == "<sks>"
    assert placeholder("<cat-toy>") == "<cat-toy>"
    assert METHOD.training_prompt(tiny_config(Path("b"), Path("i"))) == PROMPT


def test_prepare_trains_only_the_input_embeddings(base: Path) -> None:
    before = load_pipeline(str(base)).text_encoder.get_input_embeddings().weight
    pipe, trainable = prepared(base)
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert list(trainable.params) == [TOKEN] and trainable.params[TOKEN] is weight
    assert trainable.text_trainable
    trained = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    assert len(trained) == 1 and trained[0] is weight
    assert weight.shape == (before.shape[0] + 1, before.shape[1])
    assert pipe.tokenizer.convert_tokens_to_ids(TOKEN) == before.shape[0]


def test_new_token_starts_as_the_class_word(base: Path) -> None:
    pipe, trainable = prepared(base)
    dog = pipe.tokenizer.convert_tokens_to_ids("dog</w>")
    weight = trainable.params[TOKEN]
    assert torch.equal(new_row(pipe, trainable), weight[dog])
    # so the training prompt encodes exactly as the prompt with the class word in its place
    assert torch.equal(encode(pipe), encode(pipe, "a photo of a dog dog"))


def test_after_step_keeps_every_other_row_exactly(conv_base: Path) -> None:
    pipe, trainable = prepared(conv_base)
    weight = trainable.params[TOKEN]
    original = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=1e-1, weight_decay=1e-2)
    weight.grad = torch.ones_like(weight)  # a gradient on every row
    optimizer.step()
    assert not torch.equal(weight[:-1], original[:-1])  # the step moved them...
    METHOD.after_step(pipe, trainable)  # type: ignore[arg-type]
    assert torch.equal(weight[:-1], original[:-1])  # ...and after_step put them back
    assert not torch.equal(weight[-1], original[-1])  # only the new token learns: `width` values
    assert (weight != original).sum() == weight.shape[1]


def test_diffusers_loads_the_saved_embedding_to_the_same_outputs(base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(base)
    perturb(pipe, trainable)
    metadata = {"token": "sks", "class_word": "dog", "base_model": str(base), "step": "7"}
    written = METHOD.save(pipe, trainable, tmp_path, metadata)  # type: ignore[arg-type]
    assert written == tmp_path / RESULT / WEIGHTS

    fresh = load_pipeline(str(base))
    fresh.load_textual_inversion(str(written))  # diffusers alone: the token is the file's one key
    assert (encode(fresh) - encode(pipe)).abs().max() <= 1e-6
    assert not torch.equal(encode(pipe), encode(pipe, "a photo of a dog dog"))

    def images(p: object) -> np.ndarray:
        out = p(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")  # type: ignore[operator]
        return out.images

    assert np.abs(images(fresh) - images(pipe)).max() <= 1 / 255


def test_load_returns_the_concept_with_the_new_token(conv_base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(pipe, trainable)
    file = METHOD.save(pipe, trainable, tmp_path, {"token": "sks", "class_word": "dog"})  # type: ignore[arg-type]
    fresh = load_pipeline(str(conv_base))
    concept = METHOD.load(fresh, tmp_path / RESULT)  # type: ignore[arg-type]
    assert (concept.token, concept.class_word, concept.source) == (TOKEN, "dog", str(file))
    assert torch.equal(encode(fresh), encode(pipe))


def test_a_token_the_tokenizer_already_has_is_refused(conv_base: Path) -> None:
    pipe, _ = prepared(conv_base)
    unpatch(pipe)  # else refused as patched (test_methods_patches); the token stays in the tokenizer
    with pytest.raises(ConfigError, match="already has the token '<sks>'"):
        METHOD.prepare(pipe, tiny_config(conv_base, Path("unused")), torch.Generator())  # type: ignore[arg-type]


def test_state_round_trip_is_exact(conv_base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(pipe, trainable)
    saved = trainable.params[TOKEN].detach().clone()
    METHOD.save_state(trainable, tmp_path / "state.safetensors", {"step": "5"})
    perturb(pipe, trainable, seed=2)
    METHOD.load_state(trainable, tmp_path / "state.safetensors")
    assert torch.equal(trainable.params[TOKEN], saved)


def test_mis_shaped_state_is_refused_naming_file_and_tensor(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    file = tmp_path / "state.safetensors"
    save_file({TOKEN: torch.zeros(1, 7)}, str(file))
    with pytest.raises(InputError, match=rf"{file}: tensor {TOKEN} is torch.float32 of shape \(1, 7\)"):
        METHOD.load_state(trainable, file)
    save_file({"<other>": torch.zeros(1, 32)}, str(file))
    with pytest.raises(InputError, match=rf"{file}.*missing tensors \['{TOKEN}'\].*\['<other>'\]"):
        METHOD.load_state(trainable, file)
    save_file({TOKEN: torch.full((1, 32), float("nan"))}, str(file))
    with pytest.raises(InputError, match="not finite"):
        METHOD.load_state(trainable, file)
