"""Configuration dataclasses: paper defaults, and bad values refused where they are made."""

from __future__ import annotations

import json
import math
import re

import pytest
from damage import wrong_type

from persres.config import TrainConfig
from persres.errors import ConfigError


def test_learning_rate_must_be_finite_and_sane() -> None:
    for lr in (0.0, -1.0, math.inf, math.nan, 5.0):
        with pytest.raises(ConfigError, match="`lr` must be in"):
            TrainConfig(base="b", images="i", class_word="dog", lr=lr)


GOOD = TrainConfig(base="base", images="photos", class_word="dog", validation_prompts=("a V* dog",)).to_dict()


def test_a_saved_config_reads_back_as_it_was() -> None:
    assert TrainConfig.from_dict(GOOD).to_dict() == GOOD
    assert TrainConfig.from_dict({**GOOD, "lr": 1, "residual": {"rank": 16}}).residual.rank == 16  # not 16.0


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_saved_setting_of_another_type_is_named(name: str) -> None:
    """As a hand-edited config.json or state.json has them: a number where text is expected, and so on."""
    with pytest.raises(
        ConfigError, match=f"setting '{name}' is {re.escape(json.dumps(wrong_type(GOOD[name])))}"
    ):
        TrainConfig.from_dict({**GOOD, name: wrong_type(GOOD[name])})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"residual": {"rank": "big"}},
            "setting 'residual.rank' is \"big\", expected a number or a whole number",
        ),
        ({"residual": {"rank": 0.05, "alpha": 1}}, r"unknown settings \['residual.alpha'\]"),
        (
            {"validation_prompts": ["a V* dog", 3]},
            "setting 'validation_prompts' is .*, expected a list of text",
        ),
        ({"steps": True}, "setting 'steps' is true, expected a whole number"),
        (
            {"mixed_precision": "fp8"},
            "setting 'mixed_precision' is \"fp8\", expected one of 'no', 'fp16', 'bf16'",
        ),
        ({"seed": -1}, r"`seed` must be in \[0, "),
        ({"adam_weight_decay": math.inf}, "`adam_weight_decay` must be a finite number >= 0"),
        ({"base": None}, "setting 'base' is null, expected text"),
    ],
)
def test_saved_settings_are_checked_with_their_name(change: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        TrainConfig.from_dict({**GOOD, **change})


def test_a_saved_config_without_a_required_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="setting 'class_word' is missing"):
        TrainConfig.from_dict({k: v for k, v in GOOD.items() if k != "class_word"})
