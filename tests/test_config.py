"""Configuration dataclasses: paper defaults, and bad values refused where they are made."""

from __future__ import annotations

import math

import pytest

from persres.config import TrainConfig
from persres.errors import ConfigError


def test_learning_rate_must_be_finite_and_sane() -> None:
    for lr in (0.0, -1.0, math.inf, math.nan, 5.0):
        with pytest.raises(ConfigError, match="lr must be in"):
            TrainConfig(base="b", images="i", class_word="dog", lr=lr)
