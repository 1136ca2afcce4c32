"""The identifier token: checked and proposed by tokenizing; the prompt-length rule."""

from __future__ import annotations

import logging

import pytest

from persres.errors import ConfigError
from persres.macro import real_words
from persres.tiny import word_tokenizer
from persres.tokens import check_identifier, suggest_tokens


def test_suggest_token_count_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--top must be >= 1"):
        suggest_tokens(word_tokenizer(["sks"]), set(), count=0)


def test_suggested_tokens_are_rare_single_tokens_and_not_words(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = word_tokenizer("a photo of the with and sks zwx dog beach".split())
    found = suggest_tokens(tokenizer, real_words(), count=5)
    assert found and set(found) <= {"sks", "zwx"}
    assert all(tokenizer.tokenize(word) == [f"{word}</w>"] for word in found)
    with caplog.at_level(logging.WARNING):
        check_identifier(tokenizer, "dog", real_words())
        check_identifier(tokenizer, "qqq", real_words())
    assert "'dog' is a common English word" in caplog.text
    assert "'qqq' is 3 tokens" in caplog.text
