"""Concepts in prompts: placeholders, and each concept's own token columns."""

from __future__ import annotations

from dataclasses import replace

import pytest

from persres.errors import ConfigError
from persres.formats.concepts import Concept, concept_columns, plan_prompts
from persres.testing.tiny import word_tokenizer


def test_two_concepts_of_one_class_each_get_their_own_class_word() -> None:
    tokenizer = word_tokenizer("a photo of sks zwx dog and playing with".split())
    concepts = [Concept("sks", "dog", "a"), Concept("zwx", "dog", "b")]
    [plan] = plan_prompts(["a V1* dog playing with a V2* dog"], concepts)
    columns = concept_columns(tokenizer, plan, concepts, require=True)
    ids = tokenizer(plan.expanded).input_ids  # <start> a sks dog playing with a zwx dog <end>
    assert columns[0, : len(ids)].nonzero().flatten().tolist() == [2, 3]
    assert columns[1, : len(ids)].nonzero().flatten().tolist() == [7, 8]
    [alone] = plan_prompts(["a dog called V1*"], concepts[:1])
    assert (
        concept_columns(tokenizer, replace(alone, expanded="a dog with sks"), concepts[:1], True)[0].sum()
        == 2
    )


def test_lag_with_several_concepts_needs_a_placeholder_in_every_prompt() -> None:
    tokenizer = word_tokenizer("a photo of sks zwx dog cat".split())
    concepts = [Concept("sks", "dog", "a"), Concept("zwx", "cat", "b")]
    plans = plan_prompts(["a photo of a dog", "a V1* dog", "a V2* cat"], concepts)
    with pytest.raises(ConfigError, match="has no V1\\*, V2\\*"):
        concept_columns(tokenizer, plans[0], concepts, require=True)
    assert concept_columns(tokenizer, plans[0], concepts, require=False).sum() == 0
