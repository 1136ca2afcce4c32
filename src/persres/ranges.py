"""The ranges of the numbers a user types: one table for the command line (``persres.cli.options``) and
the web app's fields (``persres.app.fields``), so that both refuse the same values in the same words.

Only the standard library (and ``persres.config``'s constants) is imported: parsing never waits on torch.
A value out of range is a ``ValueError`` whose message says the range and the value, e.g.
``must be a finite number in [0, 100], got inf``; the caller prefixes the option or field it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from persres.config import MAX_BATCH_SIZE, MAX_PRIOR_IMAGES, MAX_SCALE, MAX_STEPS, MAX_STEPS_TRAIN

MAX_SEED = 2**32 - 1  # seeds as other Stable Diffusion tools write them; image j uses seed + j
MAX_PIXELS = 8192  # larger sides are a typo, not a request (SDXL's native side is 1024)
MAX_COUNT = 10_000  # images per prompt, prompts, suggestions: more is a typo that would run for days
SHORT = 40  # characters of a refused text quoted in the message


@dataclass(frozen=True)
class Range:
    """An int in [low, high] that ``multiple_of`` divides (``whole``), or a finite float in [low, high]
    ((low, high] with ``low_open``); no upper bound when ``high`` is None."""

    low: float
    high: float | None = None
    whole: bool = False
    multiple_of: int = 1
    low_open: bool = False

    def span(self) -> str:
        if self.whole:
            span = f">= {self.low}" if self.high is None else f"in [{self.low}, {self.high}]"
            step = f" and a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
            return f"an integer {span}{step}"
        high = "inf)" if self.high is None else f"{self.high:g}]"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}"

    def parse(self, text: str) -> int | float:
        """A value typed as text (a command line), checked."""
        try:
            value: int | float = int(text) if self.whole else float(text)
        except ValueError:
            what = self.span() if self.whole else f"a number in {self.span()}"
            raise ValueError(f"must be {what}, got {shorten(text)}") from None
        return self.check(value)

    def check(self, value: object) -> int | float:
        """A value from anywhere (a form field sends floats, or nothing when emptied), checked: NaN,
        infinity, a fraction for an integer and anything out of range are refused."""
        if isinstance(value, str):
            return self.parse(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            got = "nothing" if value is None else repr(value)[:SHORT]
            raise ValueError(f"must be {self.described()}, got {got}")
        if not math.isfinite(value) or (self.whole and not float(value).is_integer()):
            raise ValueError(f"must be {self.described()}, got {value}")
        number: int | float = int(value) if self.whole else float(value)
        below = number <= self.low if self.low_open else number < self.low
        if below or (self.high is not None and number > self.high) or int(number) % self.multiple_of:
            raise ValueError(f"must be {self.described()}, got {value}")
        return number

    def described(self) -> str:
        return self.span() if self.whole else f"a finite number in {self.span()}"


def integer(low: int, high: int | None = None, multiple_of: int = 1) -> Range:
    return Range(low, high, whole=True, multiple_of=multiple_of)


def number(low: float, high: float, low_open: bool = False) -> Range:
    return Range(low, high, low_open=low_open)


def shorten(text: str, limit: int = SHORT) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


SEED = integer(0, MAX_SEED)
STEPS = integer(1, MAX_STEPS)  # sampling: DDIM cannot take more steps than the 1000 training timesteps
TRAIN_STEPS = integer(1, MAX_STEPS_TRAIN)  # optimizer steps, and steps between checkpoints or validations
BATCH_SIZE = integer(1, MAX_BATCH_SIZE)
PRIOR_IMAGES = integer(0, MAX_PRIOR_IMAGES)
COUNT = integer(1, MAX_COUNT)
SCALE = number(-MAX_SCALE, MAX_SCALE)
PRIOR_WEIGHT = number(0.0, 100.0)
MASK_BACKGROUND_WEIGHT = number(0.0, 1.0)
PIXELS = integer(8, MAX_PIXELS, multiple_of=8)
GUIDANCE = number(0.0, 100.0)
LEARNING_RATE = number(0.0, 1.0, low_open=True)
