"""The identifier token V*: located and checked by tokenizing, never by string position."""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def token_pieces(tokenizer: PreTrainedTokenizerBase, word: str) -> list[str]:
    return list(tokenizer.tokenize(word))


def check_identifier(tokenizer: PreTrainedTokenizerBase, token: str) -> None:
    """Warn when the identifier is not a single token: the paper's V* is one rarely used token."""
    pieces = token_pieces(tokenizer, token)
    if len(pieces) != 1:
        log.warning(
            "identifier %r is %d tokens (%s) for this tokenizer; a single rare token such as 'sks' "
            "binds the concept more cleanly",
            token,
            len(pieces),
            " ".join(pieces),
        )
