"""``persres report``: one self-contained HTML page (no CDN; figures and thumbnails inlined) for a
benchmark folder: the results table, text alignment per prompt category for normal vs LAG sampling
(like the supplement's Figure 5), image-vs-text alignment scatter plots per prompt category (like its
Figure 14), and per concept a grid of references, normal samples and LAG samples.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from persres.errors import InputError, OutputExistsError  # noqa: E402
from persres.evaluation.categories import CATEGORIES  # noqa: E402
from persres.evaluation.results import RESIDUALS_ROW, read_result, read_results_csv  # noqa: E402
from persres.files import check_writable, write_text  # noqa: E402
from persres.formats.runfolder import SAMPLES  # noqa: E402
from persres.images import load_rgb  # noqa: E402

THUMB = 96
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}img{max-width:100%}
table{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td.l{text-align:left}
.row{display:flex;gap:4px;align-items:center;margin:2px 0}.row span{width:90px;font-size:12px}"""


def write_report(results_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    root = Path(results_dir)
    if not (root / "results.csv").is_file():
        raise InputError(f"{root} has no results.csv; run the benchmark with `out` {root} first")
    target = Path(out) if out else root / "report.html"
    if target.exists():
        raise OutputExistsError(f"{target} already exists; pass `out` with a new file name")
    check_writable(target, "out", folder=False)
    rows = read_results_csv(root / "results.csv")
    results = {p.parent: read_result(p) for p in sorted(root.glob("runs/*/*/result.json"))}
    body = [
        f"<h1>persres benchmark: {html.escape(str(root))}</h1>",
        "<h2>Results (means per concept)</h2>",
        table(rows),
        peers_note(rows),
        *(section for name, images in by_variant(results).items() for section in figures(name, images)),
        "<h2>Images per concept: references | normal | LAG</h2>",
        *(grid(folder, result) for folder, result in results.items()),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>persres report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return write_text(target, page, overwrite=False)


def peers_note(rows: list[dict[str, str]]) -> str:
    """Why the other methods have normal rows only, and what the cost columns mean."""
    peers = sorted({r.get("method", "") for r in rows} - {RESIDUALS_ROW, ""})
    lines = []
    if peers:
        lines.append(
            f"{', '.join(peers)}: normal sampling only. LAG (localized attention-guided sampling) applies "
            "personalized residuals inside the concept's cross-attention mask; the other methods change "
            "the whole model or the text side and have no per-layer residual to gate, so they have no "
            "lag or auto rows. Every method samples the same prompts from the same seeds."
        )
    if any(r.get("peak_memory_source") == "process-peak-rss" for r in rows):
        lines.append(
            "peak_memory_bytes on the CPU is the process's peak resident set size: the kernel keeps one "
            "per process, so it also covers what the process did before that variant."
        )
    return "".join(f"<p>{html.escape(line)}</p>" for line in lines)


def by_variant(results: dict[Path, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-image scores of residuals grouped by rank and class source, so figures never pool variants
    (the figures compare normal with LAG sampling, which only residuals have)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results.values():
        row = result["rows"][0]
        if row.get("method", RESIDUALS_ROW) != RESIDUALS_ROW:
            continue
        name = f"rank {row['rank']}, class word from {row.get('class_source', 'dataset')}"
        groups.setdefault(name, []).extend(result["images"])
    return dict(sorted(groups.items()))


def figures(name: str, images: list[dict[str, Any]]) -> list[str]:
    return [
        f"<h2>Text alignment per prompt category, normal vs LAG ({html.escape(name)})</h2>",
        figure(category_bars(images)),
        f"<h2>Image vs text alignment per prompt category ({html.escape(name)})</h2>",
        figure(scatter(images)),
    ]


def table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>No finished concepts yet.</p>"
    header = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    cells = []
    for row in rows:
        cells.append(
            "<tr>"
            + "".join(
                f"<td class='l'>{html.escape(v)}</td>"
                if k in ("concept", "category", "class_word", "method", "sampler")
                else f"<td>{html.escape(v)}</td>"
                for k, v in row.items()
            )
            + "</tr>"
        )
    return f"<table><tr>{header}</tr>{''.join(cells)}</table>"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def category_bars(images: list[dict[str, Any]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.38
    for offset, sampler in ((-width / 2, "normal"), (width / 2, "lag")):
        values = [
            mean([i["clip_t"] for i in images if i["sampler"] == sampler and i["prompt_category"] == c])
            for c in CATEGORIES
        ]
        ax.bar([x + offset for x in range(len(CATEGORIES))], values, width, label=sampler)
    ax.set_xticks(range(len(CATEGORIES)), [c.replace("_", "\n") for c in CATEGORIES], fontsize=8)
    ax.set_ylabel("CLIP text alignment")
    ax.legend()
    fig.tight_layout()
    return fig


def scatter(images: list[dict[str, Any]]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(CATEGORIES), figsize=(15, 2.8), sharex=True, sharey=True)
    for ax, category in zip(axes, CATEGORIES, strict=True):
        for sampler, marker in (("normal", "o"), ("lag", "^")):
            chosen = [i for i in images if i["sampler"] == sampler and i["prompt_category"] == category]
            ax.scatter(
                [i["clip_t"] for i in chosen],
                [i["clip_i"] for i in chosen],
                marker=marker,
                s=12,
                label=sampler,
            )
        ax.set_title(category.replace("_", " "), fontsize=9)
        ax.set_xlabel("text alignment", fontsize=8)
    axes[0].set_ylabel("image alignment", fontsize=8)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return inline_png(buffer.getvalue(), "figure")


def thumbnail(path: Path) -> str:
    small = load_rgb(path)  # a damaged image or a decompression bomb is an InputError naming it
    small.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return inline_png(buffer.getvalue(), path.name)


def inline_png(data: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def grid(folder: Path, result: dict[str, Any], per_row: int = 8) -> str:
    config = result["train_config"]
    folder_of_references = Path(config["images"])
    references = sorted(
        p
        for p in (folder_of_references.iterdir() if folder_of_references.is_dir() else [])
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    rows = [("references", references[:per_row])]
    for sampler in ("normal", "lag"):
        files = [folder / SAMPLES / i["image"] for i in result["images"] if i["sampler"] == sampler]
        rows.append((sampler, files[:per_row]))
    title = f"{folder.parent.name} ({folder.name}, class '{config['class_word']}')"  # folder: method, rank
    lines = "".join(
        f"<div class='row'><span>{name}</span>{''.join(thumbnail(p) for p in files)}</div>"
        for name, files in rows
        if files
    )
    return f"<h3>{html.escape(title)}</h3>{lines}"
