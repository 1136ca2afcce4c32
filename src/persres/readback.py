"""Reading back what persres wrote: JSON and numbers, strictly (standard library only).

Any file persres reads back (a run's ``config.json``, a checkpoint's ``state.json``, a benchmark's
results, a sample's sidecar, a residual file's metadata) may be damaged or edited by hand. Python's own
parsers let through what persres never writes, or fail with an error that is not about the file:
``json`` reads ``NaN``, ``Infinity`` and ``1e999`` (not JSON numbers) as floats, and ``int`` and ``json``
raise a bare ``ValueError`` on an integer past 4,300 digits, or a ``RecursionError`` on deep nesting.
Here each of these is a ``ValueError`` whose message says what is wrong, for the caller to name the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from persres.errors import QUOTE_LIMIT, quote

MAX_DIGITS = 20  # 2**64 has 20 digits: no count, size, seed or step persres writes is longer


def loads(text: str) -> Any:
    """Standard JSON only: no NaN or infinity, no integer longer than ``MAX_DIGITS`` digits. Every
    problem is a ``ValueError`` whose message starts "not valid JSON: "."""
    try:
        return json.loads(text, parse_int=integer, parse_float=finite, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except ValueError as exc:  # from the number parsers below
        raise ValueError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None


def load_file(path: Path) -> Any:
    """The JSON in ``path`` (``loads``; JSON is UTF-8 text, so other bytes are a ``ValueError`` too).
    ``OSError`` (missing, unreadable) is left to the caller."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid JSON: not UTF-8 text at byte {exc.start}") from None
    return loads(text)


def integer(text: str) -> int:
    """A whole number as persres writes one (optional minus, decimal digits, at most ``MAX_DIGITS``)."""
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{quote(text)} is not a whole number")
    if len(digits) > MAX_DIGITS:
        raise ValueError(f"a number of {len(digits):,} digits")
    return int(text)


def finite(text: str) -> float:
    """A finite number (an integer or a float, as ``float`` reads it)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{quote(text)} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{quote(text)} is not a finite number")
    return value


def shown(value: Any) -> str:
    """A value as JSON writes it, for a message: cut to its first ``QUOTE_LIMIT`` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}... ({len(text):,} characters)"


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")
