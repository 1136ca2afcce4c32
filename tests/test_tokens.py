"""The identifier token: checked and proposed by tokenizing; the prompt-length rule."""

from __future__ import annotations

import logging

import pytest

from persres.core.tokens import check_identifier, check_token, suggest_tokens
from persres.errors import ConfigError
from persres.testing.tiny import word_tokenizer
from persres.words import real_words


def test_suggest_token_count_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="`top` must be >= 1"):
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


SPECIAL = ["<|endoftext|>", "<|startoftext|>", "sks<|endoftext|>", "<|startoftext|>x"]


@pytest.mark.parametrize("token", SPECIAL)
@pytest.mark.parametrize("new", [False, True])
def test_special_tokens_are_refused_for_every_method(token: str, new: bool) -> None:
    tokenizer = word_tokenizer(["dog", "sks"])
    with pytest.raises(ConfigError, match=r"is or contains the tokenizer's special token '<\|"):
        check_token(tokenizer, token, new=new)


def test_an_added_token_must_be_new_to_the_vocabulary() -> None:
    tokenizer = word_tokenizer(["dog", "sks"])
    check_token(tokenizer, "<sks>", new=True)
    check_token(tokenizer, "sks", new=False)  # an existing rare token: residuals, LoRA, DreamBooth
    for token in ("sks", "dog", "dog</w>"):  # a word, or its vocabulary entry: its row would be trained
        with pytest.raises(ConfigError, match="already has the token"):
            check_token(tokenizer, token, new=True)
    tokenizer.add_tokens(["<sks>"])
    with pytest.raises(ConfigError, match="already has the token '<sks>'"):
        check_token(tokenizer, "<sks>", new=True)


def test_an_identifier_read_as_a_special_token_is_refused() -> None:
    """Pieces a tokenizer does not know become its unknown token, CLIP's <|endoftext|>: LAG would then
    read the padding positions of every prompt."""
    tokenizer = word_tokenizer(["dog", "sks"])
    with pytest.raises(ConfigError, match="reads as its special token '<\\|endoftext\\|>'"):
        check_token(tokenizer, "qqq", new=False)
