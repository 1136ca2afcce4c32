"""What a benchmark runs: its settings (``BenchmarkConfig``), its variants (concept x method x rank, for
residuals only, x class source), each variant's folder and training settings, and the settings a
rerun into the same ``--out`` must repeat.

Each method trains with its authors' recipe (``persres.methods.catalog``: steps, batch size, lr, prior
images), made into a configuration by ``persres.methods.recipes.train_config`` as ``persres train`` and
the app do. The ``train`` template's steps, batch size and lr are its own method's (residuals':
``TrainConfig``'s defaults are its recipe); ``shared_recipe`` names those of them that apply to every
method (the CLI's ``--steps``, ``--batch-size``, ``--lr`` when given).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persres.config import DEFAULT_CLIP, DEFAULT_DINO, ResidualConfig, TrainConfig
from persres.errors import ConfigError
from persres.evaluation.cc101 import ConceptEntry
from persres.inference.sampling import SampleSettings
from persres.methods.catalog import DEFAULT_METHOD, METHODS, method_info, names_where
from persres.methods.recipes import RECIPE_FIELDS, Overrides, run_settings, train_config

SAMPLER_CHOICES = ("normal", "lag", "auto")
CLASS_SOURCES = ("dataset", "nearest", "balanced")
DEFAULT_METHODS = (DEFAULT_METHOD,)


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str
    base: str
    out: str
    ranks: tuple[float | int, ...] = (0.05,)
    samplers: tuple[str, ...] = ("normal", "lag")  # residuals' rows; the other methods: normal only
    images_per_prompt: int = 5
    max_prompts: int | None = None
    concepts: tuple[str, ...] = ()  # only these image-folder names; all when empty
    train: TrainConfig | None = None  # template: steps, batch, lr (residuals'), resolution, seed, ...
    sample: SampleSettings = SampleSettings()
    clip: str = DEFAULT_CLIP
    dino: str = DEFAULT_DINO
    class_sources: tuple[str, ...] = ("dataset",)  # dataset, nearest, balanced: supplement Table 4
    nouns: str | None = None  # noun list for nearest/balanced; WordNet when None
    methods: tuple[str, ...] = DEFAULT_METHODS
    shared_recipe: tuple[str, ...] = ()  # of RECIPE_FIELDS: taken from the template by every method

    def __post_init__(self) -> None:
        for name in ("ranks", "samplers", "class_sources", "concepts", "methods", "shared_recipe"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))  # a repeat counts once
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"`max_prompts` must be >= 1, got {self.max_prompts}")
        unknown = sorted(set(self.samplers) - set(SAMPLER_CHOICES))
        if unknown or not self.samplers:
            raise ConfigError(f"`samplers` {unknown or 'none'}: choose from {', '.join(SAMPLER_CHOICES)}")
        if not self.ranks:
            raise ConfigError("give at least one `ranks`")
        for rank in self.ranks:
            ResidualConfig(rank=rank)
        unknown = sorted(set(self.class_sources) - set(CLASS_SOURCES))
        if unknown or not self.class_sources:
            raise ConfigError(f"`class_sources` {unknown or 'none'}: choose from {', '.join(CLASS_SOURCES)}")
        if self.images_per_prompt < 1:
            raise ConfigError("`images_per_prompt` must be >= 1")
        self.check_methods()

    def check_methods(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ConfigError(f"`methods` {unknown or 'none'}: choose from {', '.join(METHODS)}")
        unknown = sorted(set(self.shared_recipe) - set(RECIPE_FIELDS))
        if unknown:
            raise ConfigError(f"shared_recipe {unknown}: choose from {', '.join(RECIPE_FIELDS)}")
        without_lag = [m for m in self.methods if not METHODS[m].samples_with_lag]
        not_normal = [s for s in self.samplers if s != "normal"]
        if len(without_lag) == len(self.methods) and not_normal:
            lag = names_where(True, "samples_with_lag")
            raise ConfigError(
                f"`samplers` {', '.join(not_normal)} applies to {', '.join(lag)} only (LAG gates its "
                f"residuals); `methods` {', '.join(without_lag)} samples with `samplers` normal: drop "
                f"`samplers` or add `methods` {lag[0]}"
            )
        if without_lag and "normal" not in self.samplers:
            raise ConfigError(
                f"`methods` {', '.join(without_lag)} samples with normal sampling only; add `samplers` normal"
            )


@dataclass(frozen=True)
class Variant:
    """One concept, with one method (at one rank, for residuals) and one source of its class word."""

    entry: ConceptEntry
    rank: float | int | None  # None for the methods other than residuals
    class_source: str
    folder: Path
    method: str = DEFAULT_METHOD


def variant_folder(
    out: Path, entry: ConceptEntry, rank: float | int | None, source: str, method: str = DEFAULT_METHOD
) -> Path:
    """``runs/{concept}/rank-{r}[-class-{source}]`` for a variant with a residual rank (the layout before
    the other methods came, so such folders still resume), ``runs/{concept}/{method}[-class-{source}]``
    for the others."""
    name = method if rank is None else f"rank-{rank}"
    return out / "runs" / entry.name / (name + ("" if source == "dataset" else f"-class-{source}"))


def plan_variants(out: Path, config: BenchmarkConfig, entries: list[ConceptEntry]) -> list[Variant]:
    """Every variant of the benchmark, concept by concept (so processes split by concept)."""
    variants = []
    for entry, method, source in itertools.product(entries, config.methods, config.class_sources):
        ranks: tuple[float | int | None, ...] = config.ranks if METHODS[method].trains_residuals else (None,)
        for rank in ranks:
            folder = variant_folder(out, entry, rank, source, method)
            variants.append(Variant(entry, rank, source, folder, method))
    return variants


def variant_train_config(
    config: BenchmarkConfig, variant: Variant, class_word: str, reason: str
) -> TrainConfig:
    """The training run of one variant: the template's run settings (``TrainConfig``'s defaults without
    one) with the variant's images, class word, method and rank. The template's steps, batch size and
    lr are its method's recipe; another method takes its own recipe, but for the ``shared_recipe``."""
    images = str(variant.entry.images)
    template = config.train or TrainConfig(base=config.base, images=images, class_word=class_word)
    same = variant.method == template.method
    recipe = {k: getattr(template, k) for k in RECIPE_FIELDS if same or k in config.shared_recipe}
    init = template.residual.init if "init" in method_info(variant.method).options else None
    overrides = Overrides(**recipe, rank=variant.rank, init=init)
    run = {**run_settings(template), "class_reason": reason}
    return train_config(variant.method, config.base, images, class_word, overrides, **run)


def recipe_of(train_config: TrainConfig) -> dict[str, Any]:
    """The recipe a variant trained with, for its ``result.json``."""
    prior = method_info(train_config.method).takes_prior_images  # the others ignore the fields
    return {
        "method": train_config.method,
        "steps": train_config.steps,
        "batch_size": train_config.batch_size,
        "lr": train_config.lr,
        "prior_images": train_config.prior_images if prior else 0,
        "prior_weight": train_config.prior_weight if prior else 0.0,
    }


def settings_of(config: BenchmarkConfig) -> dict[str, Any]:
    """What every variant's result depends on besides its concept, method, rank and class source.
    ``methods`` and ``shared_recipe`` are left out for residuals alone, so that benchmark folders
    written before the other methods came still resume."""
    keep = ["base", "samplers", "images_per_prompt", "max_prompts", "train", "sample", "clip", "dino"]
    keep.append("nouns")
    if config.methods != DEFAULT_METHODS:
        keep += ["methods", "shared_recipe"]
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k in keep}, default=str))
