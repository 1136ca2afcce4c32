"""A benchmark's result files: every variant's ``result.json`` merged into ``results.csv`` and
``summary.json``, and all of them (``benchmark.json`` too) read back.

Any of them can be damaged (a full disk, a crash outside persres' atomic writes, a copy gone wrong)
or edited by hand, and the benchmark and the report read them back: each is checked for the fields
that are used, and a damaged one is an ``InputError`` that names the file and what to do.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from persres import readback
from persres.errors import InputError, quote
from persres.evaluation.categories import CATEGORIES, sampler_for
from persres.evaluation.result_rows import (
    COSTS,
    CSV_FIELDS,
    METRICS,
    RESIDUALS_ROW,
    from_csv,
    row_problem,
    value_problem,
)
from persres.files import write_json, write_text

REDO = "delete it and rerun persres benchmark with the same `out` and settings to redo that variant"


def read_json(path: Path, fix: str) -> Any:
    """The JSON in ``path``; ``fix`` says what to do when it is damaged."""
    try:
        return readback.load_file(path)
    except ValueError as exc:
        raise InputError(f"{path} is damaged ({exc}); {fix}") from None
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None


def read_settings(path: Path) -> dict[str, Any]:
    """A benchmark folder's ``benchmark.json``: the settings its results were made with."""
    fix = (
        "it records the settings of the results in that folder: restore it, or choose another `out` "
        "(deleting it lets a rerun mix results made with other settings)"
    )
    saved = read_json(path, fix)
    if not isinstance(saved, dict):
        raise InputError(f"{path} is damaged (not a JSON object); {fix}")
    return saved


def read_result(path: Path) -> dict[str, Any]:
    """A variant's ``result.json``, checked to hold every field that the merge and the report use."""
    result = read_json(path, REDO)
    problem = result_problem(result)
    if problem:
        raise InputError(f"{path} is damaged ({problem}); {REDO}")
    return result  # type: ignore[no-any-return]


def result_problem(result: Any) -> str | None:
    """What is wrong with a parsed ``result.json``, or None."""
    if not isinstance(result, dict):
        return "not a JSON object"
    rows, images, config = result.get("rows"), result.get("images"), result.get("train_config")
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        return "'rows' is not a non-empty list of objects"
    for number, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            return f"row {number} {problem}"
    if not isinstance(images, list) or not all(isinstance(image, dict) for image in images):
        return "'images' is not a list of objects"
    for number, image in enumerate(images):
        problem = image_problem(image)
        if problem:
            return f"image {number} {problem}"
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k), str) for k in ("images", "class_word")
    ):
        return "'train_config' lacks its images folder or class word"
    return None


def image_problem(image: dict[str, Any]) -> str | None:
    """An image's file name (in the samples folder), sampler, prompt category and scores."""
    name = image.get("image")
    if not isinstance(name, str):
        return "lacks the text field 'image'"
    if Path(name).name != name or name in ("", ".", ".."):
        return f"names {quote(name)}, not a file of the samples folder"
    if image.get("prompt_category") not in CATEGORIES:
        category = readback.shown(image.get("prompt_category"))
        return f"has prompt_category {category}, not one of {', '.join(CATEGORIES)}"
    for key in ("sampler", *METRICS):
        if key not in image:
            return f"lacks the field {key!r}"
        problem = value_problem(key, image[key])
        if problem:
            return f"field {key!r} {problem}"
    return None


def read_results_csv(path: Path) -> list[dict[str, str]]:
    """``results.csv``: a header of persres' columns, and rows of exactly its columns whose every value
    is what its field holds (``result_rows``): the report shows them as measured."""
    fix = "delete it and rerun persres benchmark with the same `out` and settings to rebuild it"
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is damaged (not UTF-8 text at byte {exc.start}); {fix}") from None
    except csv.Error as exc:
        raise InputError(f"{path} is damaged ({exc}); {fix}") from None
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    missing = [name for name in ("concept", "rank", "sampler") if name not in header]
    if missing or len(set(header)) != len(header) or not set(header) <= set(CSV_FIELDS):
        raise InputError(f"{path} is damaged (its header {quote(','.join(header))} is not persres'); {fix}")
    for number, row in enumerate(rows, start=1):
        if None in row or None in row.values():
            raise InputError(
                f"{path} is damaged (row {number} has {'more' if None in row else 'fewer'} fields than "
                f"its header); {fix}"
            )
        try:
            problem = row_problem(from_csv(row), "column")
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise InputError(f"{path} is damaged (row {number}, {problem}); {fix}")
    return rows


def included(image: dict[str, Any], sampler: str) -> bool:
    """Whether a sampler's row is made with this image; ``auto`` picks per prompt by its category."""
    wanted = sampler_for(image["prompt_category"]) if sampler == "auto" else sampler
    return bool(image["sampler"] == wanted)


def pick(scores: list[dict[str, Any]], sampler: str) -> list[dict[str, Any]]:
    return [image for image in scores if included(image, sampler)]


def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {key: round(statistics.fmean(r[key] for r in rows), 6) for key in METRICS} if rows else {}


def merge_results(out: Path) -> tuple[Path, Path]:
    """Rebuild ``results.csv`` and ``summary.json`` from every finished variant."""
    results = [read_result(p) for p in sorted(out.glob("runs/*/*/result.json"))]
    rows = sorted(
        (row for r in results for row in r["rows"]),
        key=lambda r: (r["concept"], variant_label(r), r["sampler"]),
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = write_text(out / "results.csv", buffer.getvalue())
    summary_path = write_json(out / "summary.json", summarize(results))
    return csv_path, summary_path


def variant_label(row: dict[str, Any]) -> str:
    """A row's variant but its concept: "rank=0.05" for residuals (as before the other methods came),
    "method=lora" for the others; " class=nearest" added for a class source other than the dataset."""
    method = row.get("method", RESIDUALS_ROW)
    label = f"rank={row['rank']}" if method == RESIDUALS_ROW else f"method={method}"
    source = row.get("class_source", "dataset")
    return label + ("" if source == "dataset" else f" class={source}")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means overall, per concept category and per prompt category, for each variant x sampler, and
    per variant what training cost (means over concepts; the largest peak memory)."""
    rows = [dict(row, label=variant_label(row)) for r in results for row in r["rows"]]
    variants = sorted({(r["label"], r["sampler"]) for r in rows})
    summary: dict[str, Any] = {
        "concepts": sorted({r["concept"] for r in rows}),
        "overall": {},
        "per_category": {},
        "per_prompt_category": {},
        "costs": costs(rows),
    }
    for label, sampler in variants:
        key = f"{label} sampler={sampler}"
        mine = [r for r in rows if (r["label"], r["sampler"]) == (label, sampler)]
        summary["overall"][key] = means(mine)
        for category in sorted({r["category"] for r in mine}):
            summary["per_category"].setdefault(category, {})[key] = means(
                [r for r in mine if r["category"] == category]
            )
        chosen = [
            image
            for r in results
            if variant_label(r["rows"][0]) == label
            for image in pick(r["images"], sampler)
        ]
        for category in CATEGORIES:
            subset = [image for image in chosen if image["prompt_category"] == category]
            if subset:
                summary["per_prompt_category"].setdefault(category, {})[key] = means(subset)
    return summary


def costs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean trainable parameters, result bytes and training seconds over its concepts,
    and the largest peak memory, from the rows that record them all (rows before them lack the columns)."""
    found: dict[str, dict[str, Any]] = {}
    for label in sorted({r["label"] for r in rows}):
        mine = {
            r["concept"]: r
            for r in rows
            if r["label"] == label and all(k in r for k in (*COSTS, "train_seconds"))
        }
        if not mine:
            continue
        found[label] = {
            **{k: round(statistics.fmean(r[k] for r in mine.values()), 2) for k in COSTS[:2]},
            "train_seconds": round(statistics.fmean(r["train_seconds"] for r in mine.values()), 2),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in mine.values()),
            "peak_memory_source": sorted({r.get("peak_memory_source", "") for r in mine.values()}),
        }
    return found
