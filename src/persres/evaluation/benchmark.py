"""The benchmark runner: for every concept of a CustomConcept101-format dataset and every method (and
rank, for residuals), train, sample every prompt from the same seeds (residuals: normal and LAG
sampling from the same noise; the other methods: normal sampling only), and score the images.

Layout of ``out``: ``runs/{concept}/rank-{r}/`` (residuals) or ``runs/{concept}/{method}/`` (the
other methods; see ``persres.evaluation.benchmark_plan``) holds the training run, the samples and
``result.json``, which is written last and atomically: a variant with a ``result.json`` is done and
is skipped by a rerun, one without is redone (training resumes from its checkpoint). A damaged
``result.json`` (not JSON, or lacking a field) of a variant the rerun covers is logged and the variant
redone; one of a variant it does not cover is refused, naming it, before anything is trained.
``results.csv`` (one row per variant x sampler, with what training cost) and ``summary.json`` are
rebuilt from all ``result.json`` files, so rows are never duplicated or lost. Every prompt is checked
against the base model's tokenizer (identifier, class word, length) before the first concept is trained.

Under ``accelerate launch -m persres benchmark ...`` the concepts are split round-robin across the
processes (one per GPU, or across nodes); each trains alone on its device; the main process merges.
``--sampler auto`` rows take, per prompt, the LAG or the normal image following the prompt's category.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from accelerate import PartialState

from persres.backbones import backbone_for_base, default_guidance_for_base
from persres.config import DEFAULT_TOKEN, TrainConfig
from persres.core.pipeline import load_pipeline, load_prompt_readers, resolve_device
from persres.errors import ConfigError, InputError
from persres.evaluation.benchmark_plan import (  # noqa: F401  (re-exported: the benchmark's public names)
    CLASS_SOURCES,
    SAMPLER_CHOICES,
    BenchmarkConfig,
    Variant,
    plan_variants,
    recipe_of,
    settings_of,
    variant_folder,
    variant_train_config,
)
from persres.evaluation.categories import prompt_category
from persres.evaluation.cc101 import ConceptEntry, check_prompts, load_dataset
from persres.evaluation.evaluate import Scorers, evaluate_images, image_files, read_sidecar, strip_identifier
from persres.evaluation.macro import load_nouns, suggest_classes
from persres.evaluation.measure import peak_memory, reset_peak_memory, size_on_disk
from persres.evaluation.result_rows import row_method
from persres.evaluation.results import means, merge_results, pick, read_result, read_settings
from persres.files import check_apart, write_json
from persres.formats.runfolder import SAMPLES, find_run
from persres.inference.outputs import write_samples
from persres.inference.sampling import sample
from persres.methods import METHODS, check_runs_on, get_method
from persres.training.train import TrainResult, train

log = logging.getLogger(__name__)

SETTINGS_FILE = "benchmark.json"


def run_benchmark(config: BenchmarkConfig, device: str = "auto", progress: bool = True) -> Path:
    """Run (or finish) the benchmark; returns the output folder. Safe to rerun after a crash. No
    `guidance`: the base family's, resolved before the settings are recorded (a rerun compares numbers)."""
    out = Path(config.out)
    inputs = {"dataset": config.dataset, "base": config.base, "clip": config.clip}
    check_apart(out, "out", [*inputs.items(), ("dino", config.dino), ("nouns", config.nouns)])
    config = with_base_guidance(config)
    entries = select(load_dataset(config.dataset), config.concepts)
    check_inputs(config, entries)
    state = PartialState(cpu=resolve_device(device).type == "cpu")
    check_other_results(out, config, entries)  # before the settings are written: a refusal writes nothing
    check_same_settings(out, config, state.is_main_process)
    state.wait_for_everyone()
    mine = entries[state.process_index :: state.num_processes]
    scorers: Scorers | None = None
    for variant in plan_variants(out, config, mine):
        if is_done(variant.folder):
            log.info("skipping %s: already done", variant.folder)
            continue
        scorers = scorers or Scorers.load(config.clip, config.dino, str(state.device))
        run_variant(config, variant, scorers, str(state.device), progress, state.process_index)
        log.info("%s done by process %d", variant.folder, state.process_index)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_results(out)
    state.wait_for_everyone()
    return out


def with_base_guidance(config: BenchmarkConfig) -> BenchmarkConfig:
    """``config`` with the base family's `guidance` (``Backbone.default_guidance``) when none was given,
    read from the base's model_index.json without loading it."""
    default = default_guidance_for_base(config.base)
    return replace(config, sample=config.sample.with_guidance(default))


def is_done(folder: Path) -> bool:
    """Whether the variant has a sound ``result.json``; a damaged one is logged and the variant redone."""
    if not (folder / "result.json").is_file():
        return False
    try:
        read_result(folder / "result.json")
    except InputError as exc:
        log.warning("%s; redoing the variant now", str(exc).split("; ")[0])
        return False
    return True


def check_other_results(out: Path, config: BenchmarkConfig, entries: list[ConceptEntry]) -> None:
    """The merge reads every ``result.json`` under ``out``: a damaged one of a variant this run does not
    redo (another --concept, --method, --rank or --class-source) is refused now, before hours of
    training."""
    ours = {variant.folder for variant in plan_variants(out, config, entries)}
    for path in sorted(out.glob("runs/*/*/result.json")):
        if path.parent not in ours:
            read_result(path)


def check_inputs(config: BenchmarkConfig, entries: list[ConceptEntry]) -> None:
    """What can be checked before the first concept is trained: that every method trains on the base's
    family, the noun list, and every prompt with the dataset's class word against the base model's
    tokenizers (nearest and balanced class words are known only once CLIP has ranked the nouns: their
    prompts are checked then, before that training)."""
    backbone = backbone_for_base(config.base)
    for method in config.methods:  # e.g. a peer method that does not train on Flux: refused by name now
        check_runs_on(method, backbone, config.base)
    if config.nouns is not None and set(config.class_sources) != {"dataset"}:
        load_nouns(config.nouns)
    if "dataset" in config.class_sources:
        check_entry_prompts(config, [(entry, entry.class_word) for entry in entries])


def check_entry_prompts(config: BenchmarkConfig, cases: list[tuple[ConceptEntry, str]]) -> None:
    """Each (concept, class word)'s prompts as they will be sampled, with the tokenizers of the base
    model's text encoders that carry the prompt (``load_prompt_readers``: SD's CLIP, Flux's T5)."""
    readers = load_prompt_readers(config.base)
    token = config.train.token if config.train else DEFAULT_TOKEN
    for entry, class_word in cases:
        count = config.max_prompts or len(entry.templates)
        check_prompts(entry, class_word, token, readers, count)


def check_same_settings(out: Path, config: BenchmarkConfig, is_main: bool = True) -> None:
    """A rerun into an existing --out resumes it, so it must ask for the same benchmark (the same
    methods too: add methods in another --out)."""
    path = out / SETTINGS_FILE
    wanted = settings_of(config)
    if path.is_file():
        saved = read_settings(path)
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            listed = ", ".join(changed)  # cut: a hand-edit may add any number of keys
            listed = listed if len(listed) <= 120 else f"{listed[:120]}..."
            raise ConfigError(
                f"{path} records other settings ({listed}) than asked for: rerun with the same "
                f"settings to resume the benchmark in {out}, or choose another `out`"
            )
    elif is_main:
        write_json(path, wanted)


def select(entries: list[ConceptEntry], names: tuple[str, ...]) -> list[ConceptEntry]:
    if not names:
        return entries
    unknown = sorted(set(names) - {e.name for e in entries})
    if unknown:
        raise ConfigError(f"`concepts` {unknown}: not in the dataset; it has {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


def class_word_for(variant: Variant, scorers: Scorers, nouns: str | None, progress: bool) -> tuple[str, str]:
    """The class word to train and sample with, and why."""
    if variant.class_source == "dataset":
        return variant.entry.class_word, "dataset.json class_prompt"
    found = suggest_classes(
        scorers,
        variant.entry.images,
        3,
        variant.class_source,  # type: ignore[arg-type]
        nouns=None if nouns is None else load_nouns(nouns),
        progress=progress,
    )
    listed = "WordNet noun" if nouns is None else f"noun from {nouns}"
    return found[0].noun, f"{variant.class_source} {listed}, cosine {found[0].score:.4f}"


def run_variant(
    config: BenchmarkConfig,
    variant: Variant,
    scorers: Scorers,
    device: str,
    progress: bool,
    process_index: int = 0,
) -> None:
    """Train, sample and score one variant; ``result.json`` marks it done.

    Text alignment is always scored against the dataset's prompt (its own class word), so class
    sources are compared on the same texts, as in the supplement's Table 4."""
    entry, folder = variant.entry, variant.folder
    class_word, reason = class_word_for(variant, scorers, config.nouns, progress)
    if variant.class_source != "dataset":  # the dataset's class word was checked before any training
        check_entry_prompts(config, [(entry, class_word)])
    train_config = variant_train_config(config, variant, class_word, reason)
    result, costs = train_variant(train_config, folder / "train", device, progress)
    count = config.max_prompts or len(entry.templates)
    prompts = list(entry.prompts_with(class_word)[:count])
    canonical = dict(zip(prompts, entry.prompts[:count], strict=True))
    samplers = config.samplers if METHODS[variant.method].samples_with_lag else ("normal",)
    started = time.perf_counter()
    sample_variant(config, variant, result.residuals, prompts, samplers, device, progress)
    sample_seconds = time.perf_counter() - started
    scores = score_samples(folder / SAMPLES, entry, scorers, canonical)
    rows = [
        {
            "concept": entry.name,
            "category": entry.category,
            "class_word": class_word,
            "class_source": variant.class_source,
            "method": row_method(variant.method),
            **({} if variant.rank is None else {"rank": variant.rank}),
            "sampler": sampler,
            **means(pick(scores, sampler)),
            **costs,
            "sample_seconds": round(sample_seconds, 2),
            "num_images": len(pick(scores, sampler)),
        }
        for sampler in samplers
    ]
    write_json(
        folder / "result.json",
        {
            "rows": rows,
            "images": scores,
            "train_config": train_config.to_dict(),
            "recipe": recipe_of(train_config),
            "process_index": process_index,
        },
    )


def train_variant(
    train_config: TrainConfig, out: Path, device: str, progress: bool
) -> tuple[TrainResult, dict[str, Any]]:
    """Train (or resume) one variant's run; what it cost: trainable parameters, the result's bytes on
    disk, seconds and peak memory (see ``persres.evaluation.measure`` for what the peak covers)."""
    target = resolve_device(device)
    reset_peak_memory(target)
    started = time.perf_counter()
    result = train(
        train_config,
        out,
        resume=find_run(out) is not None,  # a run killed before its marker restarts
        device=device,
        progress=progress,
        distributed=False,
    )
    seconds = time.perf_counter() - started
    peak, source = peak_memory(target)
    return result, {
        "trainable_parameters": result.parameters,
        "file_size_bytes": size_on_disk(result.residuals),
        "train_seconds": round(seconds, 2),
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
    }


def sample_variant(
    config: BenchmarkConfig,
    variant: Variant,
    trained: Path,
    prompts: list[str],
    samplers: tuple[str, ...],
    device: str,
    progress: bool,
) -> None:
    """Sample every prompt into ``samples/`` from a fresh base with the variant's result loaded, from
    the same seeds for every method (normal and LAG images of one seed share their noise)."""
    samples_dir = variant.folder / SAMPLES
    shutil.rmtree(samples_dir, ignore_errors=True)  # a crashed attempt's partial images
    pipe = load_pipeline(config.base, device=device)
    concepts = [get_method(variant.method).load(pipe, trained)]
    settings = replace(config.sample, num_images=config.images_per_prompt)
    needs_both = set(samplers) != {"normal"} and set(samplers) != {"lag"}
    kind = "both" if needs_both else samplers[0]
    images = sample(pipe, prompts, concepts, settings, kind, progress=progress)  # type: ignore[arg-type]
    write_samples(samples_dir, images, settings, {"base": config.base, "token": concepts[0].token})


def score_samples(
    samples_dir: Path, entry: ConceptEntry, scorers: Scorers, canonical: dict[str, str]
) -> list[dict[str, Any]]:
    """Per-image scores with the image's sampler, prompt and prompt category; text alignment against
    ``canonical[prompt]`` (the dataset's wording of the prompt that was sampled)."""
    files = image_files(samples_dir, "sample")
    sidecars = [read_sidecar(p.with_suffix(".json"), ("prompt", "sampler", "seed")) for p in files]
    texts = [strip_identifier(canonical[s["prompt"]]) for s in sidecars]
    scored = evaluate_images(scorers, files, image_files(entry.images, "reference"), texts)["images"]
    for row, sidecar in zip(scored, sidecars, strict=True):
        row.update(
            sampler=sidecar["sampler"],
            prompt=sidecar["prompt"],
            seed=sidecar["seed"],
            prompt_category=prompt_category(canonical[sidecar["prompt"]], entry.class_word),
        )
    return scored
