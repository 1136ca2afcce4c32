"""The identifier token V*: checked and proposed by tokenizing, never by string position.

The paper's V* is "a rarely used existing token". CLIP's BPE vocabulary is ordered by merge rank, so
late (high-id) whole-word tokens are the rarest. ``suggest_tokens`` proposes the rarest whole-word
tokens of 3-4 letters that are not English words (WordNet lemmas or function words): users of peer
tools complain that "sks" is a rifle, and a real word drags its meaning into the concept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from persres.errors import ConfigError, quote

log = logging.getLogger(__name__)

UNBOUNDED = 10**6  # transformers says model_max_length 1e30 for tokenizers saved without a limit

WORD_END = "</w>"


def text_length(tokenizer: PreTrainedTokenizerBase, text_config: Any) -> int:
    """Tokens per prompt, start and end tokens included (77 for CLIP): the tokenizer's
    ``model_max_length`` bounded by the text model's ``max_position_embeddings`` (``text_config`` is the
    text encoder's config). transformers 5 leaves ``model_max_length`` at 1e30 when a tokenizer config
    lacks it (a CLIPProcessor saved by transformers 5 does), and padding to that raises
    ``OverflowError``; the text model cannot read more positions than it has embeddings for."""
    candidates = (
        getattr(tokenizer, "model_max_length", None),
        getattr(text_config, "max_position_embeddings", None),
    )
    limits = [n for n in candidates if isinstance(n, int) and 2 < n < UNBOUNDED]
    if not limits:
        raise ConfigError(
            "neither the tokenizer (model_max_length) nor the text encoder (max_position_embeddings) "
            "states how many tokens a prompt may have; fix the base model's tokenizer_config.json"
        )
    return min(limits)


@dataclass(frozen=True)
class PromptReader:
    """A text encoder whose token positions the denoiser attends to (``Backbone.attended_towers``: SD's
    CLIP, SDXL's two CLIPs, Flux's T5, not its pooled CLIP): the tokenizer a prompt is checked with, how
    many tokens the encoder reads (``text_length``), and its name for messages (``T5EncoderModel``)."""

    tokenizer: PreTrainedTokenizerBase
    limit: int
    name: str


def reader_of(tokenizer: PreTrainedTokenizerBase, text_config: Any) -> PromptReader:
    """The ``PromptReader`` of a tokenizer and its text encoder's config, named by the config's
    architecture (its model type when none is recorded)."""
    names = getattr(text_config, "architectures", None) or [getattr(text_config, "model_type", "encoder")]
    return PromptReader(tokenizer, text_length(tokenizer, text_config), str(names[0]))


def check_token(tokenizer: PreTrainedTokenizerBase, token: str, new: bool) -> None:
    """Refuse an identifier that is, holds or is read as one of the tokenizer's special tokens
    (``<|startoftext|>``, ``<|endoftext|>``, padding; CLIP reads pieces it does not know as
    ``<|endoftext|>``): every prompt has them, so a concept bound to one would be everywhere (LAG would
    read the padding positions, a learned row would change every prompt's padding).

    With ``new`` (a method that adds the token: Textual Inversion, Custom Diffusion, Perfusion) the token
    is checked as the string it will be added as, and one the vocabulary already has is refused, checked
    in the vocabulary itself: transformers 5's ``add_tokens`` counts an existing special or vocabulary
    token as added, and training would then overwrite its row."""
    inside = [t for t in tokenizer.all_special_tokens if t in token]
    if inside:
        raise ConfigError(
            f"identifier {quote(token)} is or contains the tokenizer's special token {quote(inside[0])}, "
            "which every prompt holds; choose another `token` (see persres suggest-token)"
        )
    if new:
        pieces = list(tokenizer.tokenize(token))
        if token in tokenizer.get_vocab() or (len(pieces) == 1 and pieces[0] != tokenizer.unk_token):
            raise ConfigError(
                f"the tokenizer already has the token {quote(token)} (as {quote(pieces[0])}); this method "
                "adds a new token and trains its row: choose another `token`, or load a fresh base"
            )
        return
    ids = tokenizer(token, add_special_tokens=False).input_ids
    read_as = [t for t in tokenizer.all_special_tokens if tokenizer.convert_tokens_to_ids(t) in ids]
    if read_as:
        raise ConfigError(
            f"identifier {quote(token)} has pieces this tokenizer does not know, which it reads as its "
            f"special token {quote(read_as[0])}, held by every prompt; choose another `token` "
            "(see persres suggest-token)"
        )


def check_identifier(
    tokenizer: PreTrainedTokenizerBase,
    token: str,
    real_words: set[str] | None = None,
    reader: str = "this tokenizer",
) -> None:
    """Warn when the identifier is several tokens (for ``reader``'s tokenizer) or a real word."""
    pieces = list(tokenizer.tokenize(token))
    if len(pieces) != 1:
        log.warning(
            "identifier %s is %d tokens (%s) for %s; a single rare token binds the concept more "
            "cleanly (see persres suggest-token)",
            quote(token),
            len(pieces),
            " ".join(pieces[:10]) + (" ..." if len(pieces) > 10 else ""),
            reader,
        )
    if real_words is not None and token.lower() in real_words:
        log.warning(
            "identifier %s is a common English word: its meaning will leak into the concept; "
            "see persres suggest-token",
            quote(token),
        )


def check_identifier_read(readers: Sequence[PromptReader], token: str, real_words: set[str]) -> None:
    """``check_identifier`` with the tokenizer of every text encoder that carries the prompt (Flux: T5,
    whose pieces differ from CLIP's), once per distinct split (SDXL's two CLIP tokenizers split alike)."""
    seen: set[tuple[str, ...]] = set()
    for reader in readers:
        pieces = tuple(reader.tokenizer.tokenize(token))
        if pieces not in seen:
            words = real_words if not seen else None  # a real word is warned of once
            check_identifier(reader.tokenizer, token, words, f"{reader.name}'s tokenizer")
            seen.add(pieces)


def suggest_tokens(
    tokenizer: PreTrainedTokenizerBase,
    real_words: set[str],
    count: int = 10,
    lengths: tuple[int, int] = (3, 4),
    readers: Sequence[PreTrainedTokenizerBase] = (),
) -> list[str]:
    """The rarest whole-word tokens of ``lengths`` letters that are not real words, rarest first.

    Each is checked to tokenize back to exactly one token, in ``tokenizer`` (CLIP's BPE, whose vocabulary
    order gives the rarity) and in each of ``readers`` (the tokenizers that carry the prompt: Flux's T5).
    """
    if count < 1:
        raise ConfigError(f"`top` must be >= 1, got {count}")
    vocab = tokenizer.get_vocab()
    found: list[str] = []
    for piece, _ in sorted(vocab.items(), key=lambda item: -item[1]):
        if not piece.endswith(WORD_END):
            continue
        word = piece[: -len(WORD_END)]
        if not (
            word.isascii() and word.isalpha() and word.islower() and lengths[0] <= len(word) <= lengths[1]
        ):
            continue
        if word in real_words or list(tokenizer.tokenize(word)) != [piece]:
            continue
        if not all(one_token(reader, word) for reader in readers):
            continue
        found.append(word)
        if len(found) == count:
            break
    return found


def one_token(tokenizer: PreTrainedTokenizerBase, word: str) -> bool:
    """Whether ``tokenizer`` reads ``word`` as one known token."""
    pieces = list(tokenizer.tokenize(word))
    return len(pieces) == 1 and pieces[0] != tokenizer.unk_token
