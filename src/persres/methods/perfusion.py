"""Perfusion (Tewel, Gal, Chechik, Atzmon, "Key-Locked Rank One Editing for Text-to-Image
Personalization", SIGGRAPH 2023): a new token, and a gated rank-one edit of every cross-attention's
key and value projections whose key is locked to the class word's (``persres.methods.rank_one``).

What trains (sec. 3): the new token's embedding (the concept input ``i*`` is the text encoder's
output at that token, so it moves as the embedding trains) and one value target ``o*_v`` per
cross-attention layer (started at ``W_v i_super``). The keys are locked: ``o*_k = W_k i_super``.

Choices where the paper is silent, stated:
- ``i*`` during training is the encoder's output at the token in the training prompt, read each
  time the loop encodes that prompt (a forward hook on the text encoder), so gradients reach the
  embedding through the prompt and through the edit; ``i_super`` is the output at the same position
  in the prompt with the class word in the token's place. ``save`` re-encodes with the final embedding.
- ``C``: the uncentered covariance of the encoder's outputs (every real token, BOS and EOS included)
  over ``len(TEMPLATES) x (len(NOUNS) + 1)`` captions (templates x common nouns and the class word),
  computed at ``prepare`` (a few seconds for SD's encoder on a GPU; not cached), ridged (rank_one.RIDGE).
  The paper estimates it on a large caption set (LAION); only C^-1 i* is saved.
- The embedding's smaller learning rate (sec. 5: a fifth of the rest) is a reparametrisation,
  row = start + EMBED_SCALE * delta: Adam moves ``delta`` by about lr per step, the row by a fifth.
- The gate: beta, tau below. The row of the embedding matrix is written after each step; every
  other row is never in the optimizer, so it stays exactly as the base has it.
- The edits and both hooks are patches with inverses (``persres.methods.patches``).

The result is ``result/perfusion.safetensors``: the token's row, i*, C^-1 i*, i_super, every layer's
o*_v, with persres' metadata (token, class word, base, method, step, beta, tau) in its header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from persres.core.tokens import text_length
from persres.errors import ConfigError, InputError, quote
from persres.methods.catalog import METHODS
from persres.methods.named_tensors import (
    NamedTensorState,
    concept_in,
    read_metadata,
    read_named,
    save_named,
)
from persres.methods.new_token import add_token, learned_row, placeholder, word_embedding, write_row
from persres.methods.patches import Patches, patching
from persres.methods.protocol import RESULT, Trainable
from persres.methods.rank_one import (
    ConceptInput,
    RankOneEdit,
    cross_attentions,
    install_edits,
    inverse_covariance,
    remove_edits,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from persres.config import TrainConfig
    from persres.formats.concepts import Concept

WEIGHTS = "perfusion.safetensors"
TOKEN_PARAM = "text_encoder.token_embedding.delta"
EMBED_SCALE = 0.2  # embedding lr / K-V lr (sec. 5, as lucidrains/perfusion-pytorch reads it: 0.006 vs 0.03)
TRAIN_GATE = (0.75, 0.1)  # (beta, tau) while training; lucidrains/perfusion-pytorch's train_beta/temperature
SAMPLE_GATE = (0.7, 0.15)  # at inference; beta within the paper's 0.6-0.75 for local key locking (sec. 5)

TEMPLATES = (
    "a photo of a {}", "a close-up photo of a {}", "a painting of a {}", "a {} in the garden",
    "a {} on the beach", "a {} next to a tree", "a rendering of a {}", "a {} in the snow",
    "a black and white photo of a {}", "a {} on a wooden table",
)  # fmt: skip
NOUNS = (
    "dog", "cat", "car", "house", "tree", "person", "woman", "man", "child", "bird", "flower", "chair",
    "table", "cup", "book", "bicycle", "horse", "boat", "city", "mountain", "river", "street", "shoe",
    "bag", "bottle", "clock", "lamp", "guitar", "teapot", "toy", "robot", "bear", "sculpture", "vase",
    "backpack", "hat", "glasses", "cake", "pizza", "building",
)  # fmt: skip


@dataclass(frozen=True)
class PerfusionTrainable(Trainable):
    """The token's ``delta`` and every layer's o*_v; ``concept`` is what the edits read by reference."""

    concept: ConceptInput | None = field(default=None, compare=False, repr=False)
    row: int = -1
    start: torch.Tensor | None = field(default=None, compare=False, repr=False)
    prompt: str = ""


class Perfusion(NamedTensorState):
    name = "perfusion"
    recipe = METHODS["perfusion"].recipe
    options = METHODS["perfusion"].options
    adds_token = True

    def training_prompt(self, config: TrainConfig) -> str:
        return f"a photo of a {placeholder(config.token)} {config.class_word}"

    def identifier(self, config: TrainConfig) -> str:
        return placeholder(config.token)

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            token, prompt = placeholder(config.token), self.training_prompt(config)
            start = word_embedding(pipe, config.class_word)
            row = add_token(pipe, token)
            for model in (pipe.unet, pipe.vae, pipe.text_encoder):
                patches.requires_grad(model, False)
            patches.dtype(pipe.text_encoder, torch.float32)  # the embedding trains in fp32, as TI's
            delta = nn.Parameter(
                torch.zeros_like(start, dtype=torch.float32, device=pipe.text_encoder.device)
            )
            start = start.to(delta)
            write_row(pipe, row, start)
            learned_row(pipe, row, lambda: start + EMBED_SCALE * delta, patches)
            position = token_position(pipe, prompt, row)
            i_super = encode(pipe, prompt.replace(token, config.class_word, 1))[0, position]
            c_inv = inverse_covariance(corpus_encodings(pipe, config.class_word))
            concept = ConceptInput(encode(pipe, prompt)[0, position], i_super, c_inv=c_inv, gate=TRAIN_GATE)
            edits = edited(pipe, concept, patches)
            record_concept_input(pipe, prompt, concept, position, patches)
            params = {TOKEN_PARAM: delta}
            params.update({f"{name}.target": e.target for name, e in edits.items() if e.target is not None})
            return PerfusionTrainable(
                params, text_trainable=True, concept=concept, row=row, start=start, prompt=prompt
            )

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        """Write the token's row into the (frozen) embedding matrix; no other row is ever touched."""
        state = the_state(trainable)
        write_row(pipe, state.row, token_row(state))

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        state = the_state(trainable)
        self.after_step(pipe, trainable)
        concept = state.concept
        assert concept is not None
        position = token_position(pipe, state.prompt, state.row)
        concept.i_star = encode(pipe, state.prompt)[0, position]  # i* of the final embedding
        tensors = {
            "token_embedding": token_row(state),
            "i_star": concept.i_star,
            "direction": concept.u(),
            "i_super": concept.i_super,
            **{name: p for name, p in trainable.params.items() if name != TOKEN_PARAM},
        }
        token = pipe.tokenizer.convert_ids_to_tokens(state.row)
        beta, tau = SAMPLE_GATE
        header = {**metadata, "token": token, "method": self.name, "beta": str(beta), "tau": str(tau)}
        folder = Path(out) / RESULT
        folder.mkdir(parents=True, exist_ok=True)
        return save_named({k: v.detach().float() for k, v in tensors.items()}, folder / WEIGHTS, header)

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        """Into a fresh base: the token's row, and the edits with the file's i*, C^-1 i* and o*_v."""
        with patching(pipe, self.name, "load") as patches:
            return self.load_result(pipe, path, patches)

    def load_result(self, pipe: StableDiffusionPipeline, path: Path, patches: Patches) -> Concept:
        """``load``, its changes recorded in ``patches``."""
        file = Path(path) / WEIGHTS if Path(path).is_dir() else Path(path)
        metadata = read_metadata(file)
        if metadata.get("method") != self.name:
            method = quote(str(metadata.get("method")))
            raise InputError(f"{file} is not a Perfusion result (method {method})")
        concept = concept_in(file, metadata, pipe.unet)
        gate = read_gate(file, metadata)
        tensors = read_named(file, expected_shapes(pipe))
        device = pipe.unet.device
        vec = {k: v.to(device, torch.float32) for k, v in tensors.items()}
        write_row(pipe, add_token(pipe, concept.token), vec["token_embedding"])
        inputs = ConceptInput(vec["i_star"], vec["i_super"], direction=vec["direction"], gate=gate)
        for name, edit in edited(pipe, inputs, patches).items():
            if edit.target is not None:
                with torch.no_grad():
                    edit.target.copy_(vec[f"{name}.target"])
                edit.target.requires_grad_(False)
        return concept


def edited(pipe: StableDiffusionPipeline, concept: ConceptInput, patches: Patches) -> dict[str, RankOneEdit]:
    """``install_edits`` on the U-Net, with its exact inverse (``remove_edits``) kept in ``patches``."""
    edits = install_edits(pipe.unet, concept)
    patches.add(partial(remove_edits, pipe.unet))
    return edits


def record_concept_input(
    pipe: StableDiffusionPipeline, prompt: str, concept: ConceptInput, position: int, patches: Patches
) -> None:
    """Whenever the training prompt is encoded, its output at the token becomes i* (with gradients);
    the hook is kept in ``patches``."""
    ids = torch.tensor(pipe.tokenizer(prompt).input_ids)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        given = args[0] if args else kwargs.get("input_ids")
        if given is None or given.shape[1] < len(ids):
            return
        match = (given[:, : len(ids)].cpu() == ids).all(dim=1).nonzero()
        if len(match):
            concept.i_star = output[0][int(match[0, 0]), position].float()

    patches.hook(pipe.text_encoder, hook, with_kwargs=True)


def token_position(pipe: StableDiffusionPipeline, prompt: str, row: int) -> int:
    ids = pipe.tokenizer(prompt).input_ids
    if row not in ids:
        raise ConfigError(f"the training prompt {quote(prompt)} does not contain its token")
    return int(ids.index(row))


def encode(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """(1, T, d) text encodings, as the U-Net sees them, without gradients."""
    with torch.no_grad():
        return pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, False)[0].float()


def corpus_encodings(pipe: StableDiffusionPipeline, class_word: str) -> torch.Tensor:
    """(N, d): the encoder's output at every real token of TEMPLATES x (NOUNS + class word)."""
    prompts = [t.format(noun) for t in TEMPLATES for noun in (*NOUNS, class_word)]
    limit = text_length(pipe.tokenizer, pipe.text_encoder.config)  # a small model's encoder may hold fewer
    batch = pipe.tokenizer(prompts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    batch = batch.to(pipe.text_encoder.device)
    with torch.no_grad():
        hidden = pipe.text_encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]  # (P, T, d)
    return hidden[batch.attention_mask.bool()].float()


def token_row(state: PerfusionTrainable) -> torch.Tensor:
    assert state.start is not None
    return (state.start + EMBED_SCALE * state.params[TOKEN_PARAM]).detach()


def expected_shapes(pipe: StableDiffusionPipeline) -> dict[str, torch.Size]:
    width = torch.Size((pipe.text_encoder.config.hidden_size,))
    shapes = {k: width for k in ("token_embedding", "i_star", "direction", "i_super")}
    for name, attn in cross_attentions(pipe.unet).items():
        shapes[f"{name}.to_v.target"] = torch.Size((attn.to_v.out_features,))
    return shapes


def read_gate(file: Path, metadata: dict[str, str]) -> tuple[float, float]:
    try:
        beta, tau = float(metadata["beta"]), float(metadata["tau"])
    except (KeyError, ValueError):
        raise InputError(f"{file} records no valid gate (beta, tau) in its metadata; retrain it") from None
    if not tau > 0:
        raise InputError(f"{file}: gate temperature tau must be > 0, got {tau}")
    return beta, tau


def the_state(trainable: Trainable) -> PerfusionTrainable:
    if not isinstance(trainable, PerfusionTrainable) or trainable.concept is None:
        raise ConfigError("Perfusion needs the Trainable its prepare() returned")
    return trainable


__all__ = ["Perfusion", "RankOneEdit"]
