"""A learned token for the methods that train one (Textual Inversion, Custom Diffusion, Perfusion): add
it to the tokenizer, give it a row of the text encoder's input embeddings, start that row from a
word's embedding, and (Custom Diffusion, Perfusion) train the row as a parameter of its own that a
forward hook puts in place, the matrix frozen. One place, so the three cannot drift apart.

Textual Inversion trains the whole matrix and puts every other row back after each step, as diffusers'
script does (``persres.methods.textual_inversion``); it uses no hook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from persres.core.tokens import check_token
from persres.errors import ConfigError, quote
from persres.methods.patches import Patches


def placeholder(token: str) -> str:
    """The learned token as prompts write it: ``sks`` -> ``<sks>``; ``<sks>`` stays."""
    return token if token.startswith("<") and token.endswith(">") else f"<{token}>"


def add_token(pipe: StableDiffusionPipeline, token: str) -> int:
    """Add ``token`` to the tokenizer and a row for it to the text encoder (never shrinking an encoder
    that has more rows than its tokenizer has tokens); the row's id. The matrix stays frozen. A special
    token or one the vocabulary has is refused (``check_token``), so no existing row is ever trained."""
    check_token(pipe.tokenizer, token, new=True)
    if pipe.tokenizer.add_tokens([token]) != 1:
        raise ConfigError(
            f"the tokenizer already has the token {quote(token)}; load a fresh base or choose another `token`"
        )
    row = int(pipe.tokenizer.convert_tokens_to_ids(token))
    if row >= pipe.text_encoder.get_input_embeddings().weight.shape[0]:
        pipe.text_encoder.resize_token_embeddings(row + 1, mean_resizing=False)
    pipe.text_encoder.get_input_embeddings().weight.requires_grad_(False)
    return row


def word_embedding(pipe: StableDiffusionPipeline, word: str) -> torch.Tensor:
    """A word's input embedding, detached: its row, or the mean of its sub-tokens' rows."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"{quote(word)} has no tokens to start the new embedding from")
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    return weight[ids[0]].clone() if len(ids) == 1 else weight[ids].mean(dim=0)


def write_row(pipe: StableDiffusionPipeline, row: int, value: torch.Tensor) -> None:
    """Write ``value`` into the (frozen) embedding matrix at ``row``, so that a saved or sampled model
    holds the learned row without the hook; no other row is touched."""
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[row] = value.to(weight.dtype)


def learned_row(
    pipe: StableDiffusionPipeline, row: int, value: Callable[[], torch.Tensor], patches: Patches
) -> None:
    """A forward hook (kept in ``patches``) on the input embedding puts ``value()`` at every position
    of token ``row``, with gradients to what ``value`` is made of; every other position reads the
    frozen matrix, so no other row can move."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        where = (args[0] == row).unsqueeze(-1)  # (B, T, 1)
        return torch.where(where, value().to(output.dtype), output)

    patches.hook(pipe.text_encoder.get_input_embeddings(), hook)
