"""The page's number fields, range-checked against the table the command line checks (``persres.ranges``)
as a handler receives them (``common.refused`` calls ``checked_args``): a bad value is refused naming the
field's label, before the handler runs.

A number field has no gradio ``minimum``/``maximum``/``precision``: gradio's own check names no field,
lets NaN through, and rounds 1.5 to 2 in an integer field (infinity: a raw ``OverflowError``) before a
handler could see the value. A slider needs its bounds to be drawn: a value outside them is refused by
gradio itself ("Value 30 is greater than maximum value 24"), one inside them (NaN, 1.5) by its rule.
(A subclass of the gradio component would check in ``preprocess``, but gradio writes a ``.pyi`` stub
beside the module of every component subclass.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from persres.errors import with_names
from persres.ranges import Range

RULE = "persres_rule"  # the attribute of a component holding its Range

# What the pages call the settings a library message names in backticks (``persres.errors``); a
# setting the app has no field for is shown by its bare name.
LABELS: dict[str, str] = {
    "base": "base model",
    "images": "photos",
    "photos": "photos",
    "class_word": "class word",
    "token": "identifier",
    "steps": "steps",
    "lr": "learning rate",
    "rank": "rank",
    "seed": "seed",
    "prompt": "prompt",
    "prompts": "prompt",
    "sampler": "sampler",
    "out": "run folder",
    "runs": "runs folder",
    "method": "method",
}


def labelled(message: str) -> str:
    """A library message as the page shows it: "`class_word` must not be empty" -> "class word must
    not be empty"."""
    return with_names(message, LABELS)


def number_field(label: str, rule: Range, value: float, **kwargs: Any) -> gr.Number:
    field = gr.Number(value=value, label=label, **kwargs)
    setattr(field, RULE, rule)
    return field


def slider_field(
    label: str, rule: Range, minimum: float, maximum: float, value: float, **kwargs: Any
) -> gr.Slider:
    field = gr.Slider(minimum, maximum, value=value, label=label, step=1 if rule.whole else None, **kwargs)
    setattr(field, RULE, rule)
    return field


def rules_of(inputs: Sequence[Any]) -> list[tuple[str, Range] | None]:
    """Per input of an event: the field's (label, rule), None for an input that is not a number field."""
    return [(str(c.label), getattr(c, RULE)) if hasattr(c, RULE) else None for c in inputs]


def checked_args(rules: Sequence[tuple[str, Range] | None], args: Sequence[Any]) -> list[Any]:
    """``args`` as gradio passes them (one per input, in order), each number field's value checked."""
    values = list(args)
    for i, found in enumerate(rules[: len(values)]):
        if found is not None:
            values[i] = checked(*found, values[i])
    return values


def checked(label: str, rule: Range, value: Any) -> int | float:
    try:
        return rule.check(value)
    except ValueError as exc:
        raise gr.Error(f"{label}: {exc}", print_exception=False) from None
