"""Argument types that check a value's range when the command line is parsed, and options shared by
several subcommands. Only the standard library is imported here: parsing never waits on torch.

A bad value ends the command at once with one line naming the option and its valid range, e.g.
``persres sample: error: argument --guidance: must be a finite number in [0, 100], got inf``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from persres.config import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    MAX_BATCH_SIZE,
    MAX_PRIOR_IMAGES,
    MAX_RANK,
    MAX_SCALE,
    MAX_STEPS_TRAIN,
    ResidualConfig,
)
from persres.errors import ConfigError

MAX_SEED = 2**32 - 1  # seeds as other Stable Diffusion tools write them; image j uses seed + j
MAX_PIXELS = 8192  # larger sides are a typo, not a request (SDXL's native side is 1024)
MAX_COUNT = 10_000  # images per prompt, prompts, suggestions: more is a typo that would run for days


def integer(low: int, high: int, multiple_of: int = 1) -> Callable[[str], int]:
    """An int in [low, high] that ``multiple_of`` divides."""
    span = f"an integer in [{low}, {high}]"
    if multiple_of > 1:
        span += f" and a multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {span}, got {shorten(text)}") from None
        if value < low or value > high or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def number(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high], or (low, high] with ``low_open``: NaN and infinity are refused."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {shorten(text)}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {value}")
        return value

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


def shorten(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


SEED = integer(0, MAX_SEED)
STEPS = integer(1, 1000)  # DDIM cannot take more steps than the 1000 training timesteps
TRAIN_STEPS = integer(1, MAX_STEPS_TRAIN)  # optimizer steps, and steps between checkpoints or validations
BATCH_SIZE = integer(1, MAX_BATCH_SIZE)
PRIOR_IMAGES = integer(0, MAX_PRIOR_IMAGES)
COUNT = integer(1, MAX_COUNT)
SCALE = number(-MAX_SCALE, MAX_SCALE)
PRIOR_WEIGHT = number(0.0, 100.0)
PIXELS = integer(8, MAX_PIXELS, multiple_of=8)
GUIDANCE = number(0.0, 100.0)
LEARNING_RATE = number(0.0, 1.0, low_open=True)


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
