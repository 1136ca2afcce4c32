"""Prompt categories (the supplement's six kinds) by a documented keyword rule."""

from __future__ import annotations

from persres.evaluation.categories import prompt_category


def test_multi_word_class_words_do_not_decide_the_category() -> None:
    assert prompt_category("photo of a V* kids table chair.", "kids table chair") == "identity"
    assert prompt_category("a photo of V* wine glass", "wine glass") == "identity"
    assert prompt_category("V* wine glass on the beach", "wine glass") == "change_background"
