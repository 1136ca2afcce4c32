"""Score toy images against what their prompts should show, with the judge.

Per image: ``identity`` (1 if every label the concept should keep is right: class, pattern, and
colour unless the prompt changed it or asked for a sketch) and ``text`` (the share of labels the
prompt asks for that are right: class word, place, style, second object, asked colour), plus each
label's own hit. ``border_change`` is the mean absolute pixel change against the base model's image
from the same noise in a 3-pixel frame, where the background is: how far personalization leaked
outside the object.
"""

from __future__ import annotations

from collections import Counter, defaultdict
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


def paired_differences(
    rows: list[dict[str, object]], reference: str, metrics: tuple[str, ...], resamples: int = 2000
) -> list[dict[str, object]]:
    """Every other variant minus ``reference`` on the same concept, prompt and seed: per metric the mean
    over prompts and a 95% bootstrap interval, resampling (concept, prompt) pairs (the seeds of one
    prompt are not independent draws). A prompt text drawn twice pairs by occurrence and counts once.
    Rows need ``variant``, ``concept``, ``prompt``, ``seed`` and the metrics."""
    keyed: dict[tuple[object, ...], dict[str, object]] = {}
    seen: Counter[tuple[object, ...]] = Counter()
    for row in rows:
        key = (row["variant"], row["concept"], row["prompt"], row["seed"])
        keyed[(*key, seen[key])] = row
        seen[key] += 1
    clusters: dict[object, dict[tuple[object, object], list[list[float]]]] = {}
    for (variant, concept, prompt, seed, occurrence), row in keyed.items():
        other = keyed.get((reference, concept, prompt, seed, occurrence))
        if variant != reference and other is not None:
            diffs = [_number(row[m]) - _number(other[m]) for m in metrics]
            clusters.setdefault(variant, defaultdict(list))[(concept, prompt)].append(diffs)
    rng = np.random.default_rng(0)
    out: list[dict[str, object]] = []
    for variant, by_prompt in clusters.items():
        per_prompt = np.array([np.mean(c, axis=0) for c in by_prompt.values()])  # (prompts, metrics)
        draws = rng.integers(0, len(per_prompt), (resamples, len(per_prompt)))
        boot = per_prompt[draws].mean(axis=1)  # (resamples, metrics)
        line: dict[str, object] = {"variant": variant, "prompts": len(per_prompt)}
        for k, metric in enumerate(metrics):
            low, high = np.percentile(boot[:, k], [2.5, 97.5])
            line[metric] = (float(per_prompt[:, k].mean()), float(low), float(high))
        out.append(line)
    return out


def _number(value: object) -> float:
    return float(value)  # type: ignore[arg-type]
