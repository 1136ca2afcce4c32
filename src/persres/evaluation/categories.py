"""Prompt categories of the supplement's user study, and the sampler each one favours.

The supplement (section 6, Figure 5) groups prompts into six kinds and finds LAG better for
*identity*, *change background* and *add object* prompts, normal sampling for *artistic style*,
*change attribute* and *object in the style of V**. The paper gives no classifier; ours is a
documented keyword rule on the prompt with V* in place of the concept, checked in this order:

1. object_in_style: the concept is a style ("in the style of V*", "V*-style", "inspired by V*").
2. artistic_style: an art medium or artist word (painting, sketch, watercolor, "... style", ...).
3. add_object: the concept is with something else ("with a", "and a", "wearing", "holding", ...).
4. change_attribute: a colour, material or shape word (red, golden, made of, wooden, ...).
5. change_background: a place or setting (in/on/at/near/under something, "background", ...).
6. identity: none of the above ("a photo of V* dog", "V* dog").
"""

from __future__ import annotations

import re
from typing import Literal

Category = Literal[
    "object_in_style", "artistic_style", "add_object", "change_attribute", "change_background", "identity"
]
CATEGORIES: tuple[Category, ...] = (
    "object_in_style",
    "artistic_style",
    "add_object",
    "change_attribute",
    "change_background",
    "identity",
)
LAG_CATEGORIES = frozenset({"identity", "change_background", "add_object"})

_CONCEPT = r"V\d*\*"
_RULES: list[tuple[Category, re.Pattern[str]]] = [
    (
        "object_in_style",
        re.compile(
            rf"(style of (a |an |the )?{_CONCEPT}|{_CONCEPT}[\w ]*-style|inspired by (a |an |the )?{_CONCEPT}"
            rf"|{_CONCEPT} \w+ (pattern|design|motif))",
            re.I,
        ),
    ),
    (
        "artistic_style",
        re.compile(
            r"\b(painting|painted|sketch|drawing|drawn|watercolou?r|oil|pencil|charcoal|cartoon|anime|comic|"
            r"illustration|art\b|artwork|pixel art|mosaic|sculpture|statue|origami|lego|style|styled|"
            r"van gogh|"
            r"monet|picasso|vermeer|rembrandt|banksy|ukiyo|impressionis\w*|cubis\w*|renaissance|pop art)\b",
            re.I,
        ),
    ),
    (
        "add_object",
        re.compile(
            r"\b(with (a|an|the|two|some|its)\b|and (a|an|the)\b|wearing|holding|playing with|next to|beside|"
            r"together with|alongside|riding|carrying|on top of it|in (a|an|the) \w+ hat)",
            re.I,
        ),
    ),
    (
        "change_attribute",
        re.compile(
            r"\b(red|blue|green|yellow|purple|pink|orange|black|white|gr[ae]y|brown|golden|silver|gold|"
            r"colou?red|made of|wooden|glass|metal(lic)?|marble|plastic|crystal|furry|shiny|transparent|"
            r"cube[- ]shaped|tiny|giant|old|new|broken|wet|melting)\b",
            re.I,
        ),
    ),
    (
        "change_background",
        re.compile(
            r"\b(in|on|at|near|under|inside|above|by|among|through|floating|swimming|background|"
            r"beach|snow|forest|city|street|mountain|desert|jungle|river|lake|ocean|sea|room|garden|"
            r"space|moon|field|grass|park|kitchen|table|road)\b",
            re.I,
        ),
    ),
]


def prompt_category(prompt: str, class_word: str | None = None) -> Category:
    """The first rule that matches the prompt (with V* for the concept); identity when none does.

    ``class_word`` (several words allowed, "kids table chair") is removed with V*; without it, the one
    word after V* is taken for the class."""
    context = _without_concept_phrase(prompt, class_word)
    for category, pattern in _RULES:
        if pattern.search(prompt if category == "object_in_style" else context):
            return category
    return "identity"


def _without_concept_phrase(prompt: str, class_word: str | None = None) -> str:
    """Words around V* only: "a photo of a V* dog" -> "a photo of a"; the class word never decides."""
    phrase = rf"{_CONCEPT}\s+{re.escape(class_word)}\b" if class_word else rf"{_CONCEPT}\s+\S+"
    return re.sub(phrase, " ", prompt, flags=re.I).replace("photo of", " ")


def sampler_for(category: str) -> Literal["normal", "lag"]:
    """The sampler the supplement's study favours for a prompt category."""
    return "lag" if category in LAG_CATEGORIES else "normal"


def auto_sampler(prompt: str, class_word: str | None = None) -> Literal["normal", "lag"]:
    return sampler_for(prompt_category(prompt, class_word))
