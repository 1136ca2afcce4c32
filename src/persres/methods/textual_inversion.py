"""Textual Inversion (Gal et al., ICLR 2023): one new token embedding, everything else frozen.

As diffusers' ``examples/textual_inversion/textual_inversion.py`` does it: a placeholder token is
added to the tokenizer, the text encoder's input embeddings are resized, the new row starts as a copy
of the initializer word's row (the paper's "coarse descriptor"; here the concept's class word), the
optimizer updates the whole input embedding matrix, and after every step every other row is put back
to its original value (the script's ``orig_embeds_params`` and ``index_no_updates``).

The placeholder is ``<{token}>`` (``<sks>`` by default; a ``--token`` already written ``<...>`` is
kept): the script's own convention (``<cat-toy>``), a string that is no word of CLIP's vocabulary.
It is the concept's token, so persres prompts say ``a photo of a V* dog`` and V* becomes ``<sks>``.
A class word of several sub-tokens starts from their mean (the script refuses such initializers).

The result is diffusers' ``learned_embeds.safetensors``, ``{token: (1, width)}``, which
``pipe.load_textual_inversion`` loads without persres; persres' metadata rides in its header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from persres.errors import ConfigError
from persres.methods.catalog import METHODS
from persres.methods.named_tensors import concept_in, read_metadata, read_named, save_named
from persres.methods.new_token import add_token, placeholder, word_embedding, write_row
from persres.methods.patches import patching
from persres.methods.protocol import RESULT, Trainable

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from persres.config import TrainConfig
    from persres.formats.concepts import Concept

WEIGHTS = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


@dataclass(frozen=True)
class TokenTrainable(Trainable):
    """The input embedding matrix, keyed by the new token; ``row`` is the token's id and ``original``
    the matrix as ``prepare`` left it, to which every other row is restored after each step."""

    row: int = -1
    original: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def count(self) -> int:
        """The values that train: one row of the embedding matrix (the whole matrix is the parameter)."""
        return int(next(iter(self.params.values())).shape[1])


class TextualInversion:
    name = "textual-inversion"
    recipe = METHODS["textual-inversion"].recipe
    options = METHODS["textual-inversion"].options
    adds_token = True

    def training_prompt(self, config: TrainConfig) -> str:
        return f"a photo of a {placeholder(config.token)} {config.class_word}"

    def identifier(self, config: TrainConfig) -> str:
        return placeholder(config.token)

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            encoder = pipe.text_encoder
            token = placeholder(config.token)
            start = word_embedding(pipe, config.class_word)
            row = add_token(pipe, token)
            for model in (pipe.unet, pipe.vae, encoder):
                patches.requires_grad(model, False)
            patches.dtype(encoder, torch.float32)  # the script trains the text encoder in fp32 always
            write_row(pipe, row, start)
            patches.requires_grad(encoder.get_input_embeddings(), True)
            weight = encoder.get_input_embeddings().weight
            return TokenTrainable(
                {token: weight}, text_trainable=True, row=row, original=weight.detach().clone()
            )

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        """Every row but the new token's back to its original value (AdamW's weight decay and any
        gradient elsewhere would move them)."""
        token, weight, state = the_token(trainable)
        assert state.original is not None
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[state.row] = False
        with torch.no_grad():
            weight[keep] = state.original[keep]

    def save_state(self, trainable: Trainable, path: Path, metadata: dict[str, str]) -> None:
        token, weight, state = the_token(trainable)
        save_named({token: weight[state.row : state.row + 1].float()}, path, metadata)

    def load_state(self, trainable: Trainable, path: Path) -> None:
        token, weight, state = the_token(trainable)
        tensors = read_named(path, {token: torch.Size((1, weight.shape[1]))})
        with torch.no_grad():
            weight[state.row] = tensors[token][0].to(weight)

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        token, weight, state = the_token(trainable)
        header = {**metadata, "token": token, "method": self.name, "format": "pt"}
        folder = out / RESULT
        folder.mkdir(parents=True, exist_ok=True)
        return save_named({token: weight[state.row : state.row + 1].float()}, folder / WEIGHTS, header)

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        """The token and its row with diffusers' loader (which patches nothing else); the pipeline is
        marked, so a second load into it is refused."""
        with patching(pipe, self.name, "load"):  # patches nothing: the token stays (see patches)
            file = path / WEIGHTS if path.is_dir() else path
            if not file.is_file():
                raise ConfigError(f"embedding file {file} not found; pass the {WEIGHTS} of a training run")
            concept = concept_in(file, read_metadata(file), pipe.unet)
            try:
                pipe.load_textual_inversion(str(file), token=concept.token)
            except ValueError as exc:  # e.g. the token is already in this tokenizer
                raise ConfigError(f"cannot load {file}: {exc}") from None
            return concept


def the_token(trainable: Trainable) -> tuple[str, torch.nn.Parameter, TokenTrainable]:
    if not isinstance(trainable, TokenTrainable) or len(trainable.params) != 1:
        raise ConfigError("textual inversion needs the Trainable its prepare() returned")
    ((token, weight),) = trainable.params.items()
    return token, weight, trainable
