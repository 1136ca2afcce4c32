"""The toy world's HTML page: metrics of base / normal / LAG, per prompt kind, and the images.

Self-contained like ``persres report`` (figures and thumbnails inlined), built from the rows of
``experiment.score_concept``. Thumbnails are shown enlarged with nearest-neighbour scaling so
32x32 images stay legible.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from persres.evaluation.categories import CATEGORIES
from persres.evaluation.report import STYLE, figure, inline_png, table
from persres.files import write_text
from persres.toyworld.experiment import VARIANTS
from persres.toyworld.quality import means

COLUMNS = ("identity", "text", "clip_t", "clip_i", "dino_i", "border_change")
EXPLAIN = (
    "<p><b>identity</b>: share of images in which the judge reads the concept's class, pattern and "
    "colour (colour not asked when the prompt changes it or asks for a sketch). <b>text</b>: share of "
    "the prompt's asked labels (class word, place, style, second object, colour) read right. "
    "<b>clip_t / clip_i / dino_i</b>: persres evaluate with the toy world's oracle CLIP and DINO. "
    "<b>border_change</b>: mean absolute change of the 3-pixel frame against the base model's image "
    "from the same noise (background leakage). The base model sees the class word only.</p>"
)


def _fmt(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for key in keys:
        value = row.get(key, "")
        out[key] = f"{value:.3f}" if isinstance(value, float) else str(value)
    return out


def summary_tables(rows: list[dict[str, Any]]) -> str:
    overall = sorted(means(rows, ("variant",)), key=lambda r: VARIANTS.index(str(r["variant"])))
    by_kind = means(rows, ("category", "variant"))
    by_kind.sort(key=lambda r: (CATEGORIES.index(r["category"]), VARIANTS.index(str(r["variant"]))))  # type: ignore[arg-type]
    present = tuple(c for c in COLUMNS if c in rows[0])
    return (
        "<h2>All prompts</h2>"
        + table([_fmt(r, ("variant", "n", *present)) for r in overall])
        + "<h2>Per prompt kind</h2>"
        + table([_fmt(r, ("category", "variant", "n", *present)) for r in by_kind])
    )


def kind_bars(rows: list[dict[str, Any]], metric: str) -> plt.Figure:
    by_kind = {(r["category"], r["variant"]): r[metric] for r in means(rows, ("category", "variant"))}
    fig, ax = plt.subplots(figsize=(9, 3))
    width = 0.27
    for i, variant in enumerate(VARIANTS):
        ax.bar(
            np.arange(len(CATEGORIES)) + (i - 1) * width,
            [float(by_kind.get((c, variant), 0.0)) for c in CATEGORIES],  # type: ignore[arg-type]
            width,
            label=variant,
        )
    ax.set_xticks(np.arange(len(CATEGORIES)), [c.replace("_", "\n") for c in CATEGORIES], fontsize=8)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _thumb(path: Path, scale: int = 3) -> str:
    with Image.open(path) as image:
        big = image.convert("RGB").resize(
            (image.width * scale, image.height * scale), Image.Resampling.NEAREST
        )
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    return inline_png(buffer.getvalue(), path.name)


def image_rows(rows: list[dict[str, Any]], folder: Path, photos: Path) -> str:
    refs = "".join(_thumb(p) for p in sorted(photos.glob("*.png")))
    parts = [f"<div class='row'><span>references</span>{refs}</div>"]
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        for variant in VARIANTS:
            files = [folder / r["image"] for r in rows if r["prompt"] == prompt and r["variant"] == variant]
            label = html.escape(f"{variant}: {prompt}") if variant == "base" else variant
            parts.append(f"<div class='row'><span>{label}</span>{''.join(_thumb(f) for f in files)}</div>")
    return "".join(parts)


def write_toy_report(
    rows: list[dict[str, Any]], folder: Path, photos: Path, out: str | os.PathLike[str], title: str
) -> Path:
    body = [
        f"<h1>{html.escape(title)}</h1>",
        EXPLAIN,
        summary_tables(rows),
        "<h2>Identity and text per prompt kind</h2>",
        figure(kind_bars(rows, "identity")),
        figure(kind_bars(rows, "text")),
        "<h2>Images (same noise in each column): base | normal | LAG</h2>",
        image_rows(rows, folder, photos),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>persres toy world</title>"
        f"<style>{STYLE} .row span{{width:260px}}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return write_text(out, page, overwrite=False)
