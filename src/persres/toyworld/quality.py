"""Score toy images against what their prompts should show, with the judge.

Per image: ``identity`` (1 if every label the concept should keep is right: class, pattern, and
colour unless the prompt changed it or asked for a sketch) and ``text`` (the share of labels the
prompt asks for that are right: class word, place, style, second object, asked colour), plus each
label's own hit. ``border_change`` is the mean absolute pixel change against the base model's image
from the same noise in a 3-pixel frame, where the background is: how far personalization leaked
outside the object.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from persres.toyworld.prompts import Expectation

FRAME = 3


def check(read: dict[str, str], expect: Expectation) -> dict[str, float]:
    identity = expect.identity()
    asked = expect.asked()
    scores = {
        "identity": float(all(read[k] == v for k, v in identity.items())),
        "text": float(np.mean([read[k] == v for k, v in asked.items()])),
    }
    for name, value in {**identity, **asked}.items():
        scores[f"{name}_ok"] = float(read[name] == value)
    return scores


def border_change(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean |difference| / 255 over the frame of ``FRAME`` pixels; uint8 (H, W, 3) images."""
    diff = np.abs(image.astype(np.float32) - reference.astype(np.float32)) / 255
    frame = np.ones(diff.shape[:2], bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return float(diff[frame].mean())


def means(rows: Iterable[dict[str, object]], by: tuple[str, ...]) -> list[dict[str, object]]:
    """Mean of every numeric column per group of ``by`` columns, with the group's row count."""
    groups: dict[tuple[object, ...], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in by)].append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, object] = dict(zip(by, key, strict=True))
        summary["n"] = len(members)
        numeric = sorted({k for m in members for k, v in m.items() if isinstance(v, float) and k not in by})
        for column in numeric:
            values = [float(m[column]) for m in members if column in m]  # type: ignore[arg-type]
            summary[column] = float(np.mean(values))
        out.append(summary)
    return out
