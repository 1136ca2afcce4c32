"""Prompts of the supplement's six kinds for a toy concept, each with what the image should show.

Every prompt carries an ``Expectation``: the labels the judge should read off a correct image. The
identity part (class, colour, pattern the concept should keep) and the text part (what the prompt
asks for) are scored separately, the toy analogs of image alignment and text alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.evaluation.categories import Category, prompt_category
from persres.toyworld.scenes import CLASSES, COLOURS, PLACES, SECOND_OBJECTS

Instance = tuple[str, str, str]  # (class, colour, pattern)


@dataclass(frozen=True)
class Expectation:
    cls: str
    colour: str | None  # None: not checkable (sketches have no colour)
    pattern: str
    background: str | None = None  # asked for by the prompt
    style: str | None = None
    second: str | None = None
    asked_colour: str | None = None  # a colour the prompt asks for (change of attribute)

    def identity(self) -> dict[str, str]:
        """The labels that make the image show the concept (what the prompt did not change)."""
        out = {"cls": self.cls, "pattern": self.pattern}
        if self.colour is not None and self.asked_colour is None:
            out["colour"] = self.colour
        return out

    def asked(self) -> dict[str, str]:
        """The labels the prompt's words ask for (the class word counts: it names the object)."""
        out = {"cls": self.cls}
        for name in ("background", "style", "second"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.asked_colour is not None:
            out["colour"] = self.asked_colour
        return out


@dataclass(frozen=True)
class ToyPrompt:
    text: str  # with V*
    category: Category
    expect: Expectation

    def without_concept(self) -> str:
        """The base model's prompt: the class word only ("a V* dog" -> "a dog")."""
        return " ".join(w for w in self.text.split() if w != "V*")

    def in_words(self, instance: Instance) -> str:
        """The prompt with the concept described in words, the text-only ceiling: "a V* dog on the
        beach" -> "a red striped dog on the beach"; an asked colour replaces the concept's ("a blue V*
        dog" -> "a blue striped dog"); "a cat in the style of V* dog" -> "a red striped cat"."""
        cls, colour, pattern = instance
        words = [w for w in (colour, pattern) if w != "solid"]
        if self.expect.cls != cls:
            return " ".join(["a", *words, self.expect.cls])
        if self.expect.asked_colour is not None:
            words = [w for w in words if w != colour]
        return self.text.replace("V*", " ".join(words)).replace("  ", " ")


def _others(options: tuple[str, ...] | list[str], exclude: str, offset: int, count: int) -> list[str]:
    """``count`` different options but ``exclude``, every third from ``offset`` (the next unused one
    where that comes round again: with three options, every third is the same one)."""
    rest = [o for o in options if o != exclude]
    if count > len(rest):
        raise ValueError(f"{count} different options asked for, only {len(rest)} there: {rest}")
    picked: list[str] = []
    for i in range(count):
        k = offset + i * 3
        while rest[k % len(rest)] in picked:
            k += 1
        picked.append(rest[k % len(rest)])
    return picked


def concept_prompts(instance: Instance, per_kind: int = 2, offset: int = 0) -> list[ToyPrompt]:
    """``per_kind`` prompts of each of the six kinds; ``offset`` rotates the places/colours/objects used."""
    cls, colour, pattern = instance
    concept = f"V* {cls}"
    base = Expectation(cls, colour, pattern)
    prompts: list[ToyPrompt] = []

    def add(text: str, expect: Expectation) -> None:
        prompts.append(ToyPrompt(text, prompt_category(text, cls), expect))

    for text in [f"a photo of a {concept}", f"a {concept}"][:per_kind]:
        add(text, base)
    for place in _others(list(PLACES), "", offset, per_kind):
        add(f"a {concept} {PLACES[place]}", _with(base, background=place))
    for other in _others(list(COLOURS), colour, offset, per_kind):
        add(f"a {other} {concept}", _with(base, asked_colour=other))
    for style in ("painting", "sketch")[:per_kind]:
        add(
            f"a {style} of a {concept}",
            _with(base, style=style, colour=None if style == "sketch" else colour),
        )
    for second in _others(list(SECOND_OBJECTS), "", offset, per_kind):
        add(f"a {concept} with a {second}", _with(base, second=second))
    for other in _others(CLASSES, cls, offset, per_kind):
        add(f"a {other} in the style of {concept}", _with(base, cls=other))
    return prompts


def _with(expect: Expectation, **changes: object) -> Expectation:
    values = {**expect.__dict__, **changes}
    return Expectation(**values)  # type: ignore[arg-type]
