"""Argument types that check a value's range when the command line is parsed, and options shared by
several subcommands. Only the standard library is imported here: parsing never waits on torch.

The ranges themselves are ``persres.ranges`` (the web app's fields check the same table). A bad value
ends the command at once with one line naming the option and its valid range, e.g.
``persres sample: error: argument --guidance: must be a finite number in [0, 100], got inf``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import cast

from persres import ranges
from persres.config import DEFAULT_CLIP, DEFAULT_DINO, MAX_RANK, ResidualConfig
from persres.errors import ConfigError
from persres.ranges import MAX_PIXELS, MAX_SEED, shorten  # noqa: F401 (their home before persres.ranges)


def integer(low: int, high: int, multiple_of: int = 1) -> Callable[[str], int]:
    """An int in [low, high] that ``multiple_of`` divides: every integer option has an upper bound."""
    return cast(Callable[[str], int], argument(ranges.integer(low, high, multiple_of)))


def number(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high], or (low, high] with ``low_open``: NaN and infinity are refused."""
    return cast(Callable[[str], float], argument(ranges.number(low, high, low_open)))


def argument(rule: ranges.Range) -> Callable[[str], int | float]:
    """An argparse ``type`` checking ``rule`` (the table the app's fields share, ``persres.ranges``)."""

    def parse(text: str) -> int | float:
        try:
            return rule.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def rank(text: str) -> float | int:
    """``--rank``: a fraction of each layer's width in (0, 1] or a fixed rank (``ResidualConfig``)."""
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shorten(text)} is not a number; use e.g. 0.05 or 16") from None
    try:
        return ResidualConfig.parse_rank(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"must be >= 1 and <= {MAX_RANK} (a fixed rank) or a fraction in (0, 1] (of each layer's "
            f"width), got {shorten(text)}"
        ) from None


SEED = argument(ranges.SEED)
STEPS = argument(ranges.STEPS)
TRAIN_STEPS = argument(ranges.TRAIN_STEPS)
BATCH_SIZE = argument(ranges.BATCH_SIZE)
PRIOR_IMAGES = argument(ranges.PRIOR_IMAGES)
COUNT = argument(ranges.COUNT)
SCALE = argument(ranges.SCALE)
PRIOR_WEIGHT = argument(ranges.PRIOR_WEIGHT)
MASK_BACKGROUND_WEIGHT = argument(ranges.MASK_BACKGROUND_WEIGHT)
PIXELS = argument(ranges.PIXELS)
GUIDANCE = argument(ranges.GUIDANCE)
LEARNING_RATE = argument(ranges.LEARNING_RATE)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def add_scorers(p: argparse.ArgumentParser, dino: bool = True) -> None:
    p.add_argument(
        "--clip", default=DEFAULT_CLIP, help=f"CLIP model: hub id or folder (default {DEFAULT_CLIP})"
    )
    if dino:
        p.add_argument(
            "--dino", default=DEFAULT_DINO, help=f"DINO ViT model: hub id or folder (default {DEFAULT_DINO})"
        )
