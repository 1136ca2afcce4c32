"""The fields of a benchmark result row (a ``result.json`` row, a ``results.csv`` line) and what each
may hold: text, or a number of a known type and range. Scores are CustomConcept101's (``evaluate.py``):
``clip_t`` = 2.5 * max(cos, 0) lies in [0, 2.5]; ``clip_i`` and ``dino_i`` are mean cosines in [-1, 1].

The benchmark writes these rows; the merge and the report read them back, and a hand-edited value
(text in a score column, 1e999, NaN, a score of 7) must be refused naming the row and the field, never
shown as if it were measured. Standard library only: ``persres report`` does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from persres import readback
from persres.config import ResidualConfig
from persres.errors import ConfigError, quote
from persres.methods.catalog import METHODS

METRICS = ("clip_t", "clip_i", "dino_i")  # CustomConcept101: CLIP text, CLIP image, DINO image alignment
CSV_FIELDS = (
    "concept",
    "category",
    "class_word",
    "class_source",
    "method",
    "rank",
    "sampler",
    *METRICS,
    "train_seconds",
    "sample_seconds",
    "num_images",
    "trainable_parameters",  # the columns from here on are missing in rows written before them
    "file_size_bytes",
    "peak_memory_bytes",
    "peak_memory_source",  # cuda-max-allocated, or process-peak-rss on the CPU (persres.evaluation.measure)
)
COSTS = ("trainable_parameters", "file_size_bytes", "peak_memory_bytes")
RESIDUALS_ROW = "personalized-residuals"  # residuals' rows' method; the others' rows name the method
SAMPLERS = ("normal", "lag", "auto")


def row_method(method: str) -> str:
    """The ``method`` column of a method's rows: the residual method's rows keep the name they had
    before the other methods came (and carry a ``rank``)."""
    return RESIDUALS_ROW if METHODS[method].trains_residuals else method


REQUIRED = ("concept", "category", "sampler", *METRICS)  # and rank, in residuals' rows
SLACK = 1e-4  # a mean of cosines may pass 1 by a rounding error


@dataclass(frozen=True)
class Field:
    """What one field holds: text (from ``choices`` when given), or an int or float in [low, high]."""

    kind: type
    low: float = 0.0
    high: float = math.inf
    choices: tuple[str, ...] = ()


TEXT = Field(str)
FIELDS: dict[str, Field] = {
    **{name: TEXT for name in ("concept", "category", "class_word", "class_source", "peak_memory_source")},
    "method": Field(str, choices=tuple(row_method(m) for m in METHODS)),
    "sampler": Field(str, choices=SAMPLERS),
    "rank": Field(float),  # and a rank ResidualConfig takes
    "clip_t": Field(float, 0.0, 2.5),
    "clip_i": Field(float, -1.0, 1.0),
    "dino_i": Field(float, -1.0, 1.0),
    "train_seconds": Field(float),
    "sample_seconds": Field(float),
    **{name: Field(int) for name in ("num_images", *COSTS)},
}


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with a field's value as JSON holds it (``value is 7, not in [-1, 1]``), or None."""
    field = FIELDS[name]
    if field.kind is str:
        if not isinstance(value, str):
            return f"is {readback.shown(value)}, not text"
        if field.choices and value not in field.choices:
            return f"is {quote(value)}, not one of {', '.join(field.choices)}"
        return None
    whole = field.kind is int
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return f"is {readback.shown(value)}, not a {'whole ' if whole else ''}number"
    if not (math.isfinite(value) and field.low - SLACK <= value <= field.high + SLACK):
        span = f"[{field.low:g}, {field.high:g}]" if field.high < math.inf else f">= {field.low:g}"
        return f"is {value}, not a number {'in ' if field.high < math.inf else ''}{span}"
    if name == "rank":
        try:
            ResidualConfig(rank=value)
        except ConfigError:
            return f"is {value}, neither a fraction in (0, 1] nor a whole number >= 1"
    return None


def row_problem(row: Mapping[str, Any], noun: str = "field") -> str | None:
    """What is wrong with a result row (``lacks the number field 'clip_t'``, ``field 'clip_t' is 7,
    not a number in [-1, 1]``); ``noun``: field (``result.json``) or column (``results.csv``)."""
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        return f"has unknown {noun}s {quote(', '.join(map(str, unknown)))}"
    residuals = row.get("method", RESIDUALS_ROW) == RESIDUALS_ROW  # the other methods have no rank
    for name in (*REQUIRED, "rank") if residuals else REQUIRED:
        if row.get(name) is None:
            return (
                f"lacks the text {noun} {name!r}"
                if FIELDS[name].kind is str
                else f"lacks the number {name!r}"
            )
    for name, value in row.items():
        problem = value_problem(name, value)
        if problem:
            return f"{noun} {name!r} {problem}"
    return None


def from_csv(line: Mapping[str, str]) -> dict[str, Any]:
    """A ``results.csv`` line as typed values; an empty cell is a field the row does not have (a
    column written after the row, or rank in another method's row). ``ValueError`` names the column."""
    row: dict[str, Any] = {}
    for name, text in line.items():
        if text == "" or name not in FIELDS:
            continue
        kind = FIELDS[name].kind
        try:
            if kind is str:
                row[name] = text
            elif kind is int or text.removeprefix("-").isdigit():  # rank 16 is a whole number, 0.05 not
                row[name] = readback.integer(text)
            else:
                row[name] = readback.finite(text)
        except ValueError as exc:
            raise ValueError(f"column {name!r}: {exc}") from None
    return row
