"""The benchmark runner: for every concept of a CustomConcept101-format dataset and every rank,
train, sample every prompt with normal and LAG sampling from the same noise, and score the images.

Layout of ``out``: ``runs/{concept}/rank-{r}/`` holds the training run, the samples and
``result.json``, which is written last and atomically: a variant with a ``result.json`` is done and
is skipped by a rerun, one without is redone (training resumes from its checkpoint). A damaged
``result.json`` (not JSON, or lacking a field) of a variant the rerun covers is logged and the variant
redone; one of a variant it does not cover is refused, naming it, before anything is trained.
``results.csv`` (one row per concept x method x sampler) and ``summary.json`` are rebuilt from all
``result.json`` files, so rows are never duplicated or lost. Every prompt is checked against the base
model's tokenizer (identifier, class word, length) before the first concept is trained.

Under ``accelerate launch -m persres benchmark ...`` the concepts are split round-robin across the
processes (one per GPU, or across nodes); each trains alone on its device; the main process merges.
``--sampler auto`` rows take, per prompt, the LAG or the normal image following the prompt's category.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import PartialState

from persres.categories import prompt_category
from persres.cc101 import ConceptEntry, check_prompts, load_dataset
from persres.concepts import load_concepts
from persres.config import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_TOKEN, ResidualConfig, TrainConfig
from persres.errors import ConfigError, InputError
from persres.evaluate import Scorers, evaluate_images, image_files, read_sidecar, strip_identifier
from persres.files import write_json
from persres.macro import load_nouns, suggest_classes
from persres.outputs import write_samples
from persres.pipeline import load_pipeline, load_text_encoder_config, load_tokenizer, resolve_device
from persres.results import means, merge_results, pick, read_result, read_settings
from persres.runfolder import find_run
from persres.sampling import SampleSettings, sample
from persres.tokens import text_length
from persres.train import train

log = logging.getLogger(__name__)

SAMPLER_CHOICES = ("normal", "lag", "auto")
SETTINGS_FILE = "benchmark.json"
CLASS_SOURCES = ("dataset", "nearest", "balanced")


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str
    base: str
    out: str
    ranks: tuple[float | int, ...] = (0.05,)
    samplers: tuple[str, ...] = ("normal", "lag")
    images_per_prompt: int = 5
    max_prompts: int | None = None
    concepts: tuple[str, ...] = ()  # only these image-folder names; all when empty
    train: TrainConfig | None = None  # template: steps, batch, lr, resolution, seed, ...
    sample: SampleSettings = SampleSettings()
    clip: str = DEFAULT_CLIP
    dino: str = DEFAULT_DINO
    class_sources: tuple[str, ...] = ("dataset",)  # dataset, nearest, balanced: supplement Table 4
    nouns: str | None = None  # noun list for nearest/balanced; WordNet when None

    def __post_init__(self) -> None:
        for name in ("ranks", "samplers", "class_sources", "concepts"):  # a repeated flag counts once
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"--max-prompts must be >= 1, got {self.max_prompts}")
        unknown = sorted(set(self.samplers) - set(SAMPLER_CHOICES))
        if unknown or not self.samplers:
            raise ConfigError(f"--sampler {unknown or 'none'}: choose from {', '.join(SAMPLER_CHOICES)}")
        if not self.ranks:
            raise ConfigError("give at least one --rank")
        for rank in self.ranks:
            ResidualConfig(rank=rank)
        unknown = sorted(set(self.class_sources) - set(CLASS_SOURCES))
        if unknown or not self.class_sources:
            raise ConfigError(f"--class-source {unknown or 'none'}: choose from {', '.join(CLASS_SOURCES)}")
        if self.images_per_prompt < 1:
            raise ConfigError("--images-per-prompt must be >= 1")


def run_benchmark(config: BenchmarkConfig, device: str = "auto", progress: bool = True) -> Path:
    """Run (or finish) the benchmark; returns the output folder. Safe to rerun after a crash."""
    out = Path(config.out)
    entries = select(load_dataset(config.dataset), config.concepts)
    check_inputs(config, entries)
    state = PartialState(cpu=resolve_device(device).type == "cpu")
    check_same_settings(out, config, state.is_main_process)
    check_other_results(out, config, entries)
    state.wait_for_everyone()
    mine = entries[state.process_index :: state.num_processes]
    scorers: Scorers | None = None
    for entry, rank, source in itertools.product(mine, config.ranks, config.class_sources):
        folder = variant_folder(out, entry, rank, source)
        if is_done(folder):
            log.info("skipping %s: already done", folder)
            continue
        scorers = scorers or Scorers.load(config.clip, config.dino, str(state.device))
        variant = Variant(entry, rank, source, folder)
        run_variant(config, variant, scorers, str(state.device), progress, state.process_index)
        log.info("%s done by process %d", folder, state.process_index)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_results(out)
    state.wait_for_everyone()
    return out


def variant_folder(out: Path, entry: ConceptEntry, rank: float | int, source: str) -> Path:
    return out / "runs" / entry.name / (f"rank-{rank}" + ("" if source == "dataset" else f"-class-{source}"))


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
    redo (another --concept, --rank or --class-source) is refused now, before hours of training."""
    ours = {
        variant_folder(out, e, r, s)
        for e, r, s in itertools.product(entries, config.ranks, config.class_sources)
    }
    for path in sorted(out.glob("runs/*/*/result.json")):
        if path.parent not in ours:
            read_result(path)


def check_inputs(config: BenchmarkConfig, entries: list[ConceptEntry]) -> None:
    """What can be checked before the first concept is trained: the noun list, and every prompt with
    the dataset's class word against the base model's tokenizer (nearest and balanced class words are
    known only once CLIP has ranked the nouns: their prompts are checked then, before that training)."""
    if config.nouns is not None and set(config.class_sources) != {"dataset"}:
        load_nouns(config.nouns)
    if "dataset" in config.class_sources:
        check_entry_prompts(config, [(entry, entry.class_word) for entry in entries])


def check_entry_prompts(config: BenchmarkConfig, cases: list[tuple[ConceptEntry, str]]) -> None:
    """Each (concept, class word)'s prompts as they will be sampled, with the base model's tokenizer."""
    tokenizer = load_tokenizer(config.base)
    limit = text_length(tokenizer, load_text_encoder_config(config.base))
    token = config.train.token if config.train else DEFAULT_TOKEN
    for entry, class_word in cases:
        count = config.max_prompts or len(entry.templates)
        check_prompts(entry, class_word, token, tokenizer, limit, count)


def settings_of(config: BenchmarkConfig) -> dict[str, Any]:
    """What every variant's result depends on besides its concept, rank and class source."""
    keep = (
        "base",
        "samplers",
        "images_per_prompt",
        "max_prompts",
        "train",
        "sample",
        "clip",
        "dino",
        "nouns",
    )
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k in keep}, default=str))


def check_same_settings(out: Path, config: BenchmarkConfig, is_main: bool = True) -> None:
    """A rerun into an existing --out resumes it, so it must ask for the same benchmark."""
    path = out / SETTINGS_FILE
    wanted = settings_of(config)
    if path.is_file():
        saved = read_settings(path)
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            raise ConfigError(
                f"--out {out} holds a benchmark run with other settings ({', '.join(changed)}); rerun "
                "with the same settings to resume it, or choose another --out"
            )
    elif is_main:
        write_json(path, wanted)


def select(entries: list[ConceptEntry], names: tuple[str, ...]) -> list[ConceptEntry]:
    if not names:
        return entries
    unknown = sorted(set(names) - {e.name for e in entries})
    if unknown:
        raise ConfigError(f"--concept {unknown}: not in the dataset; it has {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


@dataclass(frozen=True)
class Variant:
    """One concept at one rank with one source of its class word."""

    entry: ConceptEntry
    rank: float | int
    class_source: str
    folder: Path


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


def variant_train_config(
    config: BenchmarkConfig, variant: Variant, class_word: str, reason: str
) -> TrainConfig:
    """The training run of one variant: the template's settings (``TrainConfig``'s defaults without
    one) with the variant's images, class word and rank."""
    images = str(variant.entry.images)
    template = config.train or TrainConfig(base=config.base, images=images, class_word=class_word)
    return replace(
        template,
        base=config.base,
        images=images,
        class_word=class_word,
        class_reason=reason,
        residual=ResidualConfig(rank=variant.rank, init=template.residual.init),
    )


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
    entry, rank, folder = variant.entry, variant.rank, variant.folder
    class_word, reason = class_word_for(variant, scorers, config.nouns, progress)
    if variant.class_source != "dataset":  # the dataset's class word was checked before any training
        check_entry_prompts(config, [(entry, class_word)])
    train_config = variant_train_config(config, variant, class_word, reason)
    started = time.perf_counter()
    result = train(
        train_config,
        folder / "train",
        resume=find_run(folder / "train") is not None,  # a run killed before its marker restarts
        device=device,
        progress=progress,
        distributed=False,
    )
    train_seconds = time.perf_counter() - started
    count = config.max_prompts or len(entry.templates)
    prompts = list(entry.prompts_with(class_word)[:count])
    canonical = dict(zip(prompts, entry.prompts[:count], strict=True))
    samples_dir = folder / "samples"
    shutil.rmtree(samples_dir, ignore_errors=True)  # a crashed attempt's partial images
    started = time.perf_counter()
    pipe = load_pipeline(config.base, device=device)
    concepts = load_concepts(pipe.unet, [result.residuals])
    settings = replace(config.sample, num_images=config.images_per_prompt)
    needs_both = set(config.samplers) != {"normal"} and set(config.samplers) != {"lag"}
    kind = "both" if needs_both else config.samplers[0]
    images = sample(pipe, prompts, concepts, settings, kind, progress=progress)  # type: ignore[arg-type]
    write_samples(samples_dir, images, settings, {"base": config.base, "token": concepts[0].token})
    sample_seconds = time.perf_counter() - started
    scores = score_samples(samples_dir, entry, scorers, canonical)
    rows = [
        {
            "concept": entry.name,
            "category": entry.category,
            "class_word": class_word,
            "class_source": variant.class_source,
            "method": "personalized-residuals",
            "rank": rank,
            "sampler": sampler,
            **means(pick(scores, sampler)),
            "train_seconds": round(train_seconds, 2),
            "sample_seconds": round(sample_seconds, 2),
            "num_images": len(pick(scores, sampler)),
        }
        for sampler in config.samplers
    ]
    write_json(
        folder / "result.json",
        {
            "rows": rows,
            "images": scores,
            "train_config": train_config.to_dict(),
            "process_index": process_index,
        },
    )


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
