"""The identifier token V*: checked and proposed by tokenizing, never by string position.

The paper's V* is "a rarely used existing token". CLIP's BPE vocabulary is ordered by merge rank, so
late (high-id) whole-word tokens are the rarest. ``suggest_tokens`` proposes the rarest whole-word
tokens of 3-4 letters that are not English words (WordNet lemmas or function words): users of peer
tools complain that "sks" is a rifle, and a real word drags its meaning into the concept.
"""

from __future__ import annotations

import logging
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


def check_identifier(
    tokenizer: PreTrainedTokenizerBase, token: str, real_words: set[str] | None = None
) -> None:
    """Warn when the identifier is several tokens or a real word."""
    pieces = list(tokenizer.tokenize(token))
    if len(pieces) != 1:
        log.warning(
            "identifier %s is %d tokens (%s) for this tokenizer; a single rare token binds the concept more "
            "cleanly (see persres suggest-token)",
            quote(token),
            len(pieces),
            " ".join(pieces[:10]) + (" ..." if len(pieces) > 10 else ""),
        )
    if real_words is not None and token.lower() in real_words:
        log.warning(
            "identifier %s is a common English word: its meaning will leak into the concept; "
            "see persres suggest-token",
            quote(token),
        )


def suggest_tokens(
    tokenizer: PreTrainedTokenizerBase,
    real_words: set[str],
    count: int = 10,
    lengths: tuple[int, int] = (3, 4),
) -> list[str]:
    """The rarest whole-word tokens of ``lengths`` letters that are not real words, rarest first.

    Each is checked to tokenize back to exactly one token.
    """
    if count < 1:
        raise ConfigError(f"--top must be >= 1, got {count}")
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
        found.append(word)
        if len(found) == count:
            break
    return found
