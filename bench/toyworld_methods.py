"""Every method in one toy-world harness: same photos, prompts, seeds and judge (bench/RESULTS.md).

    python bench/toyworld_methods.py [--methods residuals lora ...] [--concepts 5] [--out DIR]

1. **Sweep**, on toy *training* instances (``TUNING``; never the held-out concepts of step 2): every
   method gets the same grid, steps ``SWEEP_STEPS`` x learning rate ``SWEEP_LR_FACTORS`` times its
   authors' own learning rate, batch 4, 5 photos. The 400-step run extends the 200-step one (same
   seed and data order, constant learning rate: it is the 400-step run). One prompt of each of the six
   kinds x 2 seeds, read by the judge; per method the cell with the highest identity +
   text wins (ties: fewer steps, then the lower learning rate).
2. **Held-out concepts**, 12 prompts (two of each kind) x 4 seeds: the base model with the class word
   only, the base model given the concept in words ("a red striped dog", the text-only ceiling), and
   every method with its chosen recipe: residuals with normal and LAG sampling, the others with normal
   sampling (LAG is what residuals bring). Same noise for every variant of a prompt and seed.
3. Markdown tables: the sweep, the choice, every variant over all prompts (judge, oracle CLIP/DINO,
   border change against the base image from the same noise, trainable parameters, file size, train
   seconds), every variant minus residuals on the same concept, prompt and seed with a 95% bootstrap
   interval over prompts, and per prompt kind.
4. ``--experiments`` (point 5): residuals' recipe with one thing changed (``EXPERIMENTS``: steps,
   learning rate, rank, init), and a run sampled with only some blocks' residuals on
   (``LAYER_ABLATIONS``), on the same held-out concepts; about 6 more minutes per concept.
5. ``--change METHOD:SETTING=VALUE[,SETTING=VALUE]`` (repeatable): the method's chosen recipe with
   those settings changed (``CHANGEABLE``; `mask` object: the photos' true object masks), trained on
   the sweep's training instances first (compared with the chosen cell, same prompts and seeds: where a
   decision is made) and on the held-out concepts last (compared with the chosen recipe there: reported,
   not tuned on).

Every finished cell's rows are a JSON file under ``--out``; a rerun with the same ``--out`` skips them
(an interrupted run continues). 2-core CPU: about 50 minutes of sweep and 10 minutes per concept (16
with ``--experiments``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from toybench import md_table

from persres.core.pipeline import load_pipeline
from persres.evaluation.evaluate import Scorers
from persres.evaluation.measure import size_on_disk
from persres.files import write_json
from persres.formats.runfolder import RESIDUALS_FILE
from persres.inference.sampling import Sample
from persres.methods import METHODS, RESIDUALS, get_method
from persres.toyworld.experiment import (
    OBJECT_MASKS,
    ToySettings,
    base_samples,
    method_samples,
    personalize,
    reference_photos,
    score_concept,
    words_samples,
)
from persres.toyworld.judge import Judge, load_judge
from persres.toyworld.prompts import Instance, concept_prompts
from persres.toyworld.quality import means, paired_differences
from persres.toyworld.scenes import HELD_OUT

# Training instances the base model saw in its captions; the recipe is chosen on them.
TUNING: tuple[Instance, ...] = (("dog", "green", "checkered"), ("cup", "blue", "striped"))
SWEEP_STEPS = (200, 400)
SWEEP_LR_FACTORS = (1.0, 5.0, 25.0)
SWEEP_SEEDS = 2
METHOD_ORDER = ("residuals", "lora", "dreambooth", "custom-diffusion", "textual-inversion", "perfusion")
JUDGED = ("identity", "text", "cls_ok", "colour_ok", "pattern_ok", "background_ok")
ORACLE = ("clip_t", "clip_i", "dino_i")
COSTS = ("trainable_parameters", "file_size_bytes", "train_seconds")
OVERALL = ("variant", "n", *JUDGED, "border_change", *ORACLE, *COSTS)


def name_of(instance: Instance) -> str:
    return "-".join(instance)


# Point 5 of the comparison: residuals' recipe with one thing changed, trained and sampled on the
# held-out concepts. The variants start from the recipe a sweep on the first training instance alone
# chose (200 steps at 5e-3, rank 0.05 m_i, zero init); with both instances the sweep chooses 400 steps.
EXPERIMENT_START: dict[str, Any] = {"steps": 200, "lr": 5e-3, "rank": 0.05, "init": "zero"}
START = "residuals, 200 steps"  # the variants' start, trained as it is
EXPERIMENTS: dict[str, dict[str, Any]] = {
    START: {},
    "residuals, 200 steps, lr 2.5e-3": {"lr": 2.5e-3},  # half the learning rate: a smaller update
    "residuals, 200 steps, rank 32": {"rank": 32},  # 5-10x the paper's rank 0.05 m_i (3 and 6 here)
    "residuals, 200 steps, random init": {"init": "random"},  # both factors drawn, as the paper's review
}
# ... and which layers: the start's run sampled with only some blocks' residuals switched on.
LAYER_ABLATIONS: dict[str, tuple[str, ...]] = {
    "residuals, 200 steps, down and mid blocks only": ("down_blocks.", "mid_block."),
    "residuals, 200 steps, up blocks only": ("up_blocks.",),
}
BOOTSTRAP_RESAMPLES = 2000
# The settings `--change` may change (ToySettings' fields), each a number or a word; `mask` object: the
# photos' true object masks (``OBJECT_MASKS``).
CHANGEABLE = (
    "steps",
    "lr",
    "lr_schedule",
    "timestep_weighting",
    "rank",
    "init",
    "mask",
    "mask_background_weight",
    "mask_background_target",
    "layers",  # sampling only: PREFIX+PREFIX, the module paths whose residuals stay on
)


@dataclass(frozen=True)
class Change:
    """Settings of a method's chosen recipe changed: ``--change residuals:mask=attention`` (one), or
    ``--change residuals:steps=800,lr_schedule=cosine`` (together)."""

    method: str
    settings: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return ", ".join([self.method, *(f"{k.replace('_', ' ')} {v}" for k, v in self.settings)])

    def applied(self, settings: ToySettings) -> ToySettings:
        changed = {k: tuple(str(v).split("+")) if k == "layers" else v for k, v in self.settings}
        return replace(settings, **changed)


def parse_change(text: str) -> Change:
    """``METHOD:SETTING=VALUE[,SETTING=VALUE]`` -> a Change; a value is a number where it reads as one."""
    method, _, assignments = text.partition(":")
    pairs = [a.partition("=") for a in assignments.split(",")]
    if method not in METHODS or not all(k in CHANGEABLE and v for k, _, v in pairs):
        raise argparse.ArgumentTypeError(
            f"--change {text!r}: write METHOD:SETTING=VALUE[,SETTING=VALUE], METHOD one of "
            f"{', '.join(METHODS)} and SETTING one of {', '.join(CHANGEABLE)} (mask: none, attention, "
            f"attention-trained or {OBJECT_MASKS})"
        )
    return Change(method, tuple((k, number_or_word(v)) for k, _, v in pairs))


def number_or_word(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def variant_names(label: str, method: str) -> dict[str, str]:
    """method_samples' sampler -> the variant's name in the tables."""
    return {"normal": label, "lag": f"{label} LAG"} if method == RESIDUALS else {"normal": label}


def fresh(folder: Path) -> Path:
    """``folder`` emptied: images a crashed attempt left (its rows were never written)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


TABLES_ONLY: list[bool] = [False]  # --tables-only: unfinished cells count as empty


def cached_rows(file: Path, compute: Any) -> list[dict[str, Any]]:
    """The rows in ``file``, or ``compute()``'s, written atomically: a rerun skips finished cells."""
    if file.is_file():
        rows: list[dict[str, Any]] = json.loads(file.read_text())
        return rows
    if TABLES_ONLY[0]:
        return []
    rows = compute()
    write_json(file, rows, overwrite=False)
    return rows


# 1. the sweep ---------------------------------------------------------------------------------------


def sweep_method(method: str, base: str, judge: Judge, out: Path) -> list[dict[str, Any]]:
    rows = []
    for factor in SWEEP_LR_FACTORS:
        for instance in TUNING:
            photos = reference_photos(instance, out / "photos" / name_of(instance))
            run = out / "runs" / f"{method}-lr{factor:g}-{name_of(instance)}"
            for steps in SWEEP_STEPS:
                cell = out / "rows" / f"{run.name}-steps{steps}.json"
                settings = toy_settings(method, steps, factor, SWEEP_SEEDS)
                compute = functools.partial(sweep_cell, base, instance, photos, run, settings, judge)
                rows += cached_rows(cell, compute)
    return rows


def toy_settings(method: str, steps: int, lr_factor: float, images: int) -> ToySettings:
    recipe = get_method(method).recipe
    return ToySettings(method=method, steps=steps, lr=recipe.lr * lr_factor, images_per_prompt=images)


def sweep_cell(
    base: str,
    instance: Instance,
    photos: Path,
    run: Path,
    settings: ToySettings,
    judge: Judge,
    border: bool = False,
) -> list[dict[str, Any]]:
    """Train (``resume`` extends 200 -> 400 steps) and score one prompt of each kind; with ``border``,
    also the base images from the same noise, for each image's border change (their rows dropped)."""
    result = personalize(base, instance, photos, run, settings, resume=run.exists())
    prompts = concept_prompts(instance, per_kind=1)
    sampling = settings.sampling()
    variants: dict[str, list[Sample]] = {}
    if border:
        pipe = load_pipeline(base, torch.float32, torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)
        variants["base"] = base_samples(pipe, prompts, sampling)
    variants |= method_samples(base, settings.method, result.residuals, prompts, sampling, settings.layers)
    images = fresh(run / f"images-{settings.steps}")
    rows = [
        r
        for r in score_concept(variants, prompts, sampling, judge, None, images, photos)
        if r["variant"] != "base"
    ]
    factor = settings.lr / get_method(settings.method).recipe.lr
    for row in rows:
        row.update(method=settings.method, steps=settings.steps, lr=settings.lr, lr_factor=factor)
        row["instance"] = name_of(instance)
    print(f"  sweep {run.name} {settings.steps} steps done", file=sys.stderr, flush=True)
    return rows


def decision_rows(
    label: str, settings: ToySettings, base: str, judge: Judge, out: Path
) -> list[dict[str, Any]]:
    """``settings`` (a chosen recipe, or one changed) on the training instances, scored like a sweep
    cell with border change; rows named as in the held-out tables, ``concept`` = the instance."""
    rows = []
    settings = replace(settings, images_per_prompt=SWEEP_SEEDS)
    names = variant_names(label, settings.method)
    for instance in TUNING:
        photos = reference_photos(instance, out / "photos" / name_of(instance))
        run = out / "runs" / f"{label}-{name_of(instance)}"
        compute = functools.partial(sweep_cell, base, instance, photos, run, settings, judge, True)
        for row in cached_rows(out / "rows" / f"{run.name}.json", compute):
            rows.append({**row, "variant": names[str(row["variant"])], "concept": row["instance"]})
    return rows


def parse_chosen(text: str) -> tuple[str, dict[str, Any]]:
    """``METHOD=STEPS@LR_FACTOR`` -> (method, its sweep cell as ``choose`` writes it, without scores)."""
    method, _, recipe = text.partition("=")
    steps, _, factor = recipe.partition("@")
    if method not in METHODS or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"--chosen {text!r}: write METHOD=STEPS@LR_FACTOR (residuals=400@5)")
    lr_factor = float(factor or 1)
    cell = {"method": method, "steps": int(steps), "lr_factor": lr_factor}
    return method, cell | {"lr": get_method(method).recipe.lr * lr_factor}


def choose(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and grid cell: mean identity, text and their sum; ``chosen`` marks each method's best
    (normal sampling only: the recipe is chosen once for both of residuals' samplers)."""
    cells = means([r for r in rows if r["variant"] == "normal"], ("method", "steps", "lr_factor"))
    for cell in cells:
        cell["score"] = cell["identity"] + cell["text"]
        cell["lr"] = get_method(str(cell["method"])).recipe.lr * float(cell["lr_factor"])  # type: ignore[arg-type]
    for method in {c["method"] for c in cells}:
        mine = [c for c in cells if c["method"] == method]
        best = max(mine, key=lambda c: (c["score"], -c["steps"], -c["lr_factor"]))  # type: ignore[operator]
        for cell in mine:
            cell["chosen"] = "yes" if cell is best else ""
    return sorted(cells, key=lambda c: (METHOD_ORDER.index(str(c["method"])), c["steps"], c["lr_factor"]))


# 2. the held-out concepts ---------------------------------------------------------------------------


def entries_of(
    chosen: dict[str, dict[str, Any]], experiments: bool, changes: list[Change]
) -> dict[str, ToySettings]:
    """Label -> settings: every method's chosen recipe, with ``experiments`` residuals' variants, and
    each of ``changes`` applied to its method's chosen recipe."""
    entries = {m: chosen_settings(m, c, 4) for m, c in chosen.items()}
    if experiments and RESIDUALS in entries:
        start = replace(entries[RESIDUALS], **EXPERIMENT_START)
        entries |= {label: replace(start, **change) for label, change in EXPERIMENTS.items()}
    return entries | {c.label: c.applied(entries[c.method]) for c in changes}


def chosen_settings(method: str, cell: dict[str, Any], images: int) -> ToySettings:
    return toy_settings(method, int(cell["steps"]), float(cell["lr_factor"]), images)


def concept_rows(
    index: int,
    entries: dict[str, ToySettings],
    ablations: dict[str, tuple[str, ...]],
    base: str,
    tools: tuple[Any, Judge, Scorers],
    out: Path,
) -> list[dict[str, Any]]:
    pipe, judge, scorers = tools
    instance = HELD_OUT[index]
    folder = out / "concepts" / name_of(instance)
    photos = reference_photos(instance, folder / "photos")
    prompts = concept_prompts(instance, per_kind=2, offset=index)
    sampling = ToySettings().sampling()
    cells = [folder / "rows" / f"{name}.json" for name in ("references", *entries, *ablations)]
    unfinished = not TABLES_ONLY[0] and not all(cell.is_file() for cell in cells)
    # the reference of every variant's border change, drawn when a cell is still to be computed
    base_images = base_samples(pipe, prompts, sampling) if unfinished else []

    def references() -> list[dict[str, Any]]:
        variants = {"base": base_images, "in words": words_samples(pipe, prompts, instance, sampling)}
        images = fresh(folder / "images" / "references")
        return score_concept(variants, prompts, sampling, judge, scorers, images, photos)

    rows = cached_rows(folder / "rows" / "references.json", references)
    for label, settings in entries.items():
        compute = functools.partial(
            method_rows,
            base,
            instance,
            photos,
            prompts,
            (label, settings),
            base_images,
            (judge, scorers),
            folder,
        )
        cell = folder / "rows" / f"{label}.json"
        rows += same_recipe(cached_rows(cell, compute), settings, cell)
    ablated = folder / "runs" / START / RESIDUALS_FILE
    for label, layers in ablations.items():
        drawn = Drawn(label, base, RESIDUALS, ablated, prompts, base_images)
        compute = functools.partial(ablation_rows, drawn, layers, (judge, scorers), folder, photos)
        rows += cached_rows(folder / "rows" / f"{label}.json", compute)
    for row in rows:
        row["concept"] = " ".join(instance)
    return rows


def same_recipe(rows: list[dict[str, Any]], settings: ToySettings, cell: Path) -> list[dict[str, Any]]:
    """``rows`` if they were made with ``settings``' steps and learning rate; a cell kept from before a
    sweep chose another recipe stops the run, named."""
    for row in rows:
        if row["steps"] != settings.steps or not math.isclose(row["lr"], settings.lr):
            raise SystemExit(
                f"{cell} was made with {row['steps']} steps at lr {row['lr']:g}; the recipe is now "
                f"{settings.steps} steps at lr {settings.lr:g}: delete it (and its run) to draw it again"
            )
    return rows


def method_rows(
    base: str,
    instance: Instance,
    photos: Path,
    prompts: list[Any],
    entry: tuple[str, ToySettings],
    base_images: list[Sample],
    scoring: tuple[Judge, Scorers],
    folder: Path,
) -> list[dict[str, Any]]:
    """One method (``entry``: its label and settings) on one held-out concept: train (timed, a crashed
    run resumes), sample from the base images' noise, score."""
    label, settings = entry
    run = folder / "runs" / label
    started = time.perf_counter()
    result = personalize(base, instance, photos, run, settings, resume=run.exists())
    seconds = time.perf_counter() - started
    drawn = Drawn(label, base, settings.method, result.residuals, prompts, base_images)
    rows = sampled_rows(drawn, settings, scoring, folder, photos, settings.layers)
    costs = {
        "trainable_parameters": float(result.parameters),
        "file_size_bytes": float(size_on_disk(result.residuals)),
        "train_seconds": seconds,
    }
    for row in rows:
        row.update(costs, steps=settings.steps, lr=settings.lr)
    print(f"  {name_of(instance)} {label}: trained in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def ablation_rows(
    drawn: Drawn, layers: tuple[str, ...], scoring: tuple[Judge, Scorers], folder: Path, photos: Path
) -> list[dict[str, Any]]:
    """``START``'s run sampled with only ``layers``' residuals on (nothing trained)."""
    if not drawn.result.is_file():
        raise SystemExit(f"{drawn.result} is missing: {START!r} trains first")
    rows = sampled_rows(drawn, ToySettings(), scoring, folder, photos, layers)
    for row in rows:
        row["layers"] = " ".join(layers)
    return rows


@dataclass(frozen=True)
class Drawn:
    """What a variant draws: its label, the base model, the method and its result file, the prompts, and
    the base images from the same noise (the reference of border change)."""

    label: str
    model: str
    method: str
    result: Path
    prompts: list[Any]
    base_images: list[Sample]


def sampled_rows(
    drawn: Drawn,
    settings: ToySettings,
    scoring: tuple[Judge, Scorers],
    folder: Path,
    photos: Path,
    layers: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """``drawn``'s result sampled (residuals: normal and LAG) from the base images' noise, scored."""
    sampling = settings.sampling()
    names = variant_names(drawn.label, drawn.method)
    variants = {"base": drawn.base_images}
    for sampler, samples in method_samples(
        drawn.model, drawn.method, drawn.result, drawn.prompts, sampling, layers
    ).items():
        variants[names[sampler]] = samples
    images = fresh(folder / "images" / drawn.label)
    rows = score_concept(variants, drawn.prompts, sampling, *scoring, images, photos)
    return [r for r in rows if r["variant"] != "base"]


# 3. tables ------------------------------------------------------------------------------------------


def variant_order(methods: list[str], changes: tuple[Change, ...] = ()) -> list[str]:
    labels = [*((m, m) for m in methods), *((c.label, c.method) for c in changes)]
    return ["base", "in words", *(v for label, m in labels for v in variant_names(label, m).values())]


def experiment_names() -> set[str]:
    """Point 5's variant names (``EXPERIMENTS`` and ``LAYER_ABLATIONS``, both samplers)."""
    return {n for label in (*EXPERIMENTS, *LAYER_ABLATIONS) for n in variant_names(label, RESIDUALS).values()}


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    shown = [{**c, "lr": f"{c['lr']:g}", "lr_factor": f"{c['lr_factor']:g}"} for c in sweep]
    return md_table(shown, ("method", "steps", "lr_factor", "lr", "identity", "text", "score", "chosen"))


def difference_table(rows: list[dict[str, Any]], reference: str) -> str:
    """Every variant in ``rows`` minus ``reference``: identity and text, each with its 95% interval."""
    paired = ("identity", "text")
    differences = [
        {"variant": d["variant"], "prompts": d["prompts"], **{m: interval(d[m]) for m in paired}}
        for d in paired_differences(rows, reference, paired, BOOTSTRAP_RESAMPLES)
    ]
    return md_table(differences, ("variant", "prompts", *paired))


def interval(difference: tuple[float, float, float]) -> str:
    mean, low, high = difference
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def with_costs(summary: dict[str, Any]) -> dict[str, Any]:
    """Costs as people read them: parameters with thousands separators, KiB, whole seconds."""
    if "trainable_parameters" not in summary:
        return summary
    return {
        **summary,
        "trainable_parameters": f"{summary['trainable_parameters']:,.0f}",
        "file_size_bytes": f"{summary['file_size_bytes'] / 1024:,.0f} KiB",
        "train_seconds": f"{summary['train_seconds']:.0f}",
    }


def change_differences(rows: list[dict[str, Any]], changes: tuple[Change, ...]) -> str:
    """Each changed variant minus its method's chosen recipe with the same sampler (LAG against LAG),
    on the same concept, prompt and seed: identity, text and border change with 95% intervals."""
    paired = ("identity", "text", "border_change")
    lines = []
    for change in changes:
        references = variant_names(change.method, change.method)
        for sampler, name in variant_names(change.label, change.method).items():
            pair = [r for r in rows if r["variant"] in (name, references[sampler])]
            for d in paired_differences(pair, references[sampler], paired, BOOTSTRAP_RESAMPLES):
                line = {"variant": d["variant"], "minus": references[sampler], "prompts": d["prompts"]}
                lines.append(line | {m: interval(d[m]) for m in paired})
    return md_table(lines, ("variant", "minus", "prompts", *paired))


def changes_tables(
    decisions: list[dict[str, Any]], rows: list[dict[str, Any]], changes: tuple[Change, ...]
) -> list[str]:
    """``--change``'s sections: on the training instances (the decision), then the held-out concepts."""
    methods = list(dict.fromkeys(c.method for c in changes))
    order = variant_order(methods, changes)[2:]
    shown = [r for r in rows if r["variant"] in order]
    parts = ["\n## One setting changed, on the training instances (where a decision is made)\n"]
    overall = sorted(means(decisions, ("variant",)), key=lambda r: order.index(str(r["variant"])))
    parts += [md_table(overall, ("variant", "n", *JUDGED, "border_change")), ""]
    parts += [change_differences(decisions, changes)]
    parts += ["\n## One setting changed, on the held-out concepts (reported, not tuned on)\n"]
    overall = sorted(means(shown, ("variant",)), key=lambda r: order.index(str(r["variant"])))
    parts += [md_table([with_costs(r) for r in overall], OVERALL), ""]
    parts += [change_differences(shown, changes)]
    parts += per_kind_tables(shown, order, "one setting changed, held-out")
    return parts


def per_kind_tables(rows: list[dict[str, Any]], order: list[str], title: str) -> list[str]:
    parts = []
    kinds = means(rows, ("category", "variant"))
    for metric in ("identity", "text", "border_change"):
        by_kind: dict[str, dict[str, Any]] = {}
        for cell in kinds:
            line = by_kind.setdefault(str(cell["category"]), {"kind": cell["category"]})
            line[str(cell["variant"])] = cell.get(metric, "")
        shown = [v for v in order if any(v in line for line in by_kind.values())]
        parts += [
            f"\n## Per prompt kind ({title}): {metric}\n",
            md_table(list(by_kind.values()), ("kind", *shown)),
        ]
    return parts


def tables(
    sweep: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    methods: list[str],
    changes: tuple[Change, ...] = (),
    decisions: list[dict[str, Any]] | None = None,
) -> str:
    order = variant_order(methods)
    tried = [r for r in rows if r["variant"] in experiment_names()]  # point 5's experiments
    rows_of_methods = [r for r in rows if r["variant"] in order]
    overall = sorted(means(rows_of_methods, ("variant",)), key=lambda r: order.index(str(r["variant"])))
    parts = [
        f"## Sweep on {len(TUNING)} training instances (judge, normal, {12 * len(TUNING)} images per cell)\n",
        sweep_table(sweep),
        "\n## Held-out concepts: all prompts\n",
        md_table([with_costs(r) for r in overall], OVERALL),
    ]
    if tried:
        chosen = [r for r in overall if str(r["variant"]).startswith(RESIDUALS)]
        changed = sorted(means(tried, ("variant",)), key=lambda r: str(r["variant"]))
        parts += [
            "\n## Residuals, one thing changed (point 5; layers: switched off at sampling)\n",
            md_table([with_costs(r) for r in chosen + changed], OVERALL),
        ]
    parts += ["\n## Minus residuals (same concept, prompt and seed; 95% bootstrap interval over prompts)\n"]
    parts += [difference_table(rows_of_methods, RESIDUALS)]
    if tried:
        chosen_rows = [r for r in rows if r["variant"] == RESIDUALS]
        parts += [f"\n## Point 5's variants minus {START!r}, their start\n"]
        parts += [difference_table(chosen_rows + tried, START)]
    parts += per_kind_tables(rows_of_methods, order, "held-out")
    if changes:
        parts += changes_tables(decisions or [], rows, changes)
    return "\n".join(parts) + "\n"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--base", default="models/toyworld-base")
    parser.add_argument("--oracle", type=Path, default=Path("models/toyworld-oracle"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHOD_ORDER))
    parser.add_argument("--concepts", type=int, default=5)
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    parser.add_argument("--experiments", action="store_true", help="also residuals' EXPERIMENTS (point 5)")
    parser.add_argument(
        "--tables-only", action="store_true", help="tables from the finished cells only (nothing computed)"
    )
    parser.add_argument(
        "--change",
        type=parse_change,
        action="append",
        default=[],
        metavar="METHOD:SETTING=VALUE[,SETTING=VALUE]",
        help="also a method's chosen recipe with settings changed (repeatable; the docstring's point 5)",
    )
    parser.add_argument(
        "--chosen",
        type=parse_chosen,
        action="append",
        default=[],
        metavar="METHOD=STEPS@LR_FACTOR",
        help="a recipe an earlier sweep on this base chose (bench/RESULTS.md); that method is not swept",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-output/toyworld-methods"))
    args = parser.parse_args()
    methods = [m for m in METHOD_ORDER if m in args.methods]
    changes = tuple(args.change)
    for change in changes:
        if change.method not in methods:
            parser.error(f"--change {change.label!r}: {change.method} is not among --methods")
    TABLES_ONLY[0] = args.tables_only
    torch.manual_seed(0)
    judge = load_judge(args.oracle)

    given = dict(args.chosen)
    swept = [m for m in methods if m not in given]
    sweep_rows = [r for m in swept for r in sweep_method(m, args.base, judge, args.out / "sweep")]
    sweep = choose(sweep_rows) + [{**cell, "chosen": "given"} for cell in given.values()]
    chosen = {str(c["method"]): c for c in sweep if c["chosen"]}
    write_json(args.out / "sweep.json", sweep, overwrite=True)
    print(sweep_table(sweep))
    if args.sweep_only:
        return
    decisions = []
    for method in dict.fromkeys(c.method for c in changes):
        settings = chosen_settings(method, chosen[method], SWEEP_SEEDS)
        decisions += decision_rows(method, settings, args.base, judge, args.out / "decisions")
    for change in changes:
        settings = change.applied(chosen_settings(change.method, chosen[change.method], SWEEP_SEEDS))
        decisions += decision_rows(change.label, settings, args.base, judge, args.out / "decisions")

    pipe = load_pipeline(args.base, torch.float32, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    scorers = Scorers.load(str(args.oracle / "clip"), str(args.oracle / "dino"), device="cpu")
    entries = entries_of(chosen, args.experiments, list(changes))
    ablations = LAYER_ABLATIONS if args.experiments and RESIDUALS in entries else {}
    rows = []
    for index in range(args.concepts):
        found = concept_rows(index, entries, ablations, args.base, (pipe, judge, scorers), args.out)
        if set(variant_order(methods, changes)) <= {r["variant"] for r in found}:  # --tables-only
            rows += found
    text = tables(sweep, rows, methods, changes, decisions)
    (args.out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
