"""Personalize toy concepts and score base / normal / LAG images from the same noise.

One function per step: ``reference_photos`` draws a held-out instance's photos, ``personalize``
trains a method (residuals by default) on them with ``persres.training.train``, ``sample_variants`` draws
every prompt with the base model (class word only), then with the residuals (normal and LAG,
``persres.sample``); ``method_samples`` does the same for any method's result and ``words_samples``
gives the base model the concept in words. ``score_concept`` reads every image with the judge and
the oracle CLIP/DINO scorers (through ``persres.evaluation.evaluate``). The demo,
``bench/toyworld_quality.py`` and ``bench/toyworld_methods.py`` are made of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from persres.backbones import denoiser_of
from persres.config import InitMode, LrSchedule, MaskBackgroundTarget, TimestepWeighting
from persres.core.pipeline import load_pipeline
from persres.core.residuals import find_residuals, remove_residuals
from persres.evaluation.evaluate import Scorers, evaluate_folder
from persres.formats.concepts import PromptPlan, load_concepts
from persres.inference.outputs import write_samples
from persres.inference.sampling import Sample, Sampler, SampleSettings, generate, sample
from persres.methods import DEFAULT_METHOD, METHODS, get_method, method_info
from persres.methods.recipes import Overrides, train_config
from persres.toyworld.judge import Judge, read_images
from persres.toyworld.prompts import Instance, ToyPrompt
from persres.toyworld.quality import border_change, check
from persres.toyworld.scenes import SIZE, random_scene, render
from persres.training.train import TrainResult, train

VARIANTS = ("base", "normal", "lag")


@dataclass(frozen=True)
class ToySettings:
    # The paper's 150 steps at lr 1e-3 barely move a 32 px toy concept; 400 steps at 5e-3 learn it
    # (bench/RESULTS.md, "Toy world quality"). The benchmarks' baseline, which `--change` varies: the
    # recipe users get (scripts/demo.sh, the app's TOY_RECIPE) adds what won there, mask attention-trained
    # and min-SNR ("Learning the concept, not the photos").
    steps: int = 400
    batch_size: int = 4
    lr: float = 5e-3
    lr_schedule: LrSchedule = "constant"
    timestep_weighting: TimestepWeighting = "none"
    rank: float | int = 0.05
    init: InitMode = "zero"  # residuals' factor init (ResidualConfig)
    photos: int = 5
    images_per_prompt: int = 4
    sample_steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    method: str = DEFAULT_METHOD
    prior_images: int = 100  # class images of the methods with prior preservation (authors: 200)
    mask: str = "none"  # `mask`: none, attention, attention-trained, a folder, or OBJECT_MASKS
    mask_background_weight: float = 0.0
    mask_background_target: MaskBackgroundTarget = "photo"
    # residuals only: module path prefixes whose residuals stay on at sampling, the others off (an
    # ablation of the layers; training is unchanged); None: every layer's
    layers: tuple[str, ...] | None = None

    def sampling(self) -> SampleSettings:
        """The scenes' size given, not left to the pipeline (a Flux pipeline's default: 128 latent px)."""
        return SampleSettings(
            self.sample_steps, self.guidance, self.images_per_prompt, self.seed, height=SIZE, width=SIZE
        )


# ToySettings.mask: the photos' true object masks, written beside them (``object_masks``).
OBJECT_MASKS = "object"


def reference_photos(
    instance: Instance, folder: Path, count: int = 5, seed: int = 0, masks: Path | None = None
) -> Path:
    """``count`` photos of the instance on random backgrounds, no second object; with ``masks``, each
    photo's true object mask there too, under the photo's name (a `mask` folder: white = the object)."""
    folder.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    for i in range(count):
        scene = random_scene(rng, instance=instance, style="photo", second=None)
        image, mask = render(scene)
        Image.fromarray(image).save(folder / f"{instance[0]}-{i}.png")
        if masks is not None:
            Image.fromarray((mask * 255).round().astype(np.uint8)).save(masks / f"{instance[0]}-{i}.png")
    return folder


def personalize(
    base: str, instance: Instance, photos: Path, out: Path, settings: ToySettings, resume: bool = False
) -> TrainResult:
    """Train ``settings.method`` on the instance (class word = its class); ``resume`` continues or
    extends (more steps) the run in ``out``. The result's path is ``.residuals``."""
    info = method_info(settings.method)
    residual = info.trains_residuals  # the rank and init here are a residual's
    mask = str(object_masks(instance, photos)) if settings.mask == OBJECT_MASKS else settings.mask
    overrides = Overrides(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        rank=settings.rank if residual else None,
        init=settings.init if residual else None,
        prior_images=settings.prior_images if info.takes_prior_images else None,
    )
    config = train_config(
        settings.method,
        base,
        str(photos),
        instance[0],
        overrides,
        resolution=SIZE,
        seed=settings.seed,
        checkpoint_every=settings.steps,
        flip=False,  # toy objects always face one way
        lr_schedule=settings.lr_schedule,
        timestep_weighting=settings.timestep_weighting,
        mask=mask,
        mask_background_weight=settings.mask_background_weight,
        mask_background_target=settings.mask_background_target,
    )
    return train(config, out, resume=resume, device="cpu", progress=False, distributed=False)


def object_masks(instance: Instance, photos: Path) -> Path:
    """The true object mask of each of ``reference_photos``' photos in ``photos`` (the same draws again),
    in the sibling folder ``<photos>-masks``."""
    masks = photos.with_name(f"{photos.name}-masks")
    count = len(list(photos.glob("*.png")))
    reference_photos(instance, photos, count=count, masks=masks)  # rewrites the same photos
    return masks


def base_samples(
    pipe: StableDiffusionPipeline, prompts: list[ToyPrompt], settings: SampleSettings
) -> list[Sample]:
    """The base model on each prompt with the class word only, from the residual images' noise."""
    out = []
    for prompt in prompts:
        plan = PromptPlan(prompt.without_concept(), prompt.without_concept(), ())
        for j in range(settings.num_images):
            item = generate(pipe, plan, settings.seed + j, settings, None)
            item.sampler = "base"
            out.append(item)
    return out


def words_samples(
    pipe: StableDiffusionPipeline, prompts: list[ToyPrompt], instance: Instance, settings: SampleSettings
) -> list[Sample]:
    """The base model given the concept in words ("a red striped dog on the beach"), same noise."""
    out = []
    for prompt in prompts:
        text = prompt.in_words(instance)
        for j in range(settings.num_images):
            item = generate(pipe, PromptPlan(text, text, ()), settings.seed + j, settings, None)
            item.sampler = "in words"
            out.append(item)
    return out


def method_samples(
    base: str,
    method: str,
    result: Path,
    prompts: list[ToyPrompt],
    settings: SampleSettings,
    layers: tuple[str, ...] | None = None,
) -> dict[str, list[Sample]]:
    """A fresh base pipeline with ``result`` loaded: {"normal": ...} (and "lag" for residuals), each
    in prompt order then seed order, from the same noise as ``base_samples``. ``layers`` (residuals
    only): module path prefixes whose residuals stay on, the others switched off (an ablation)."""
    pipe = load_pipeline(base, torch.float32, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    concepts = [get_method(method).load(pipe, result)]
    if layers is not None:
        for path, wrapper in find_residuals(denoiser_of(pipe)).items():
            wrapper.enabled = path.startswith(layers)
    samplers = ("normal", "lag") if METHODS[method].samples_with_lag else ("normal",)
    kind: Sampler = "both" if len(samplers) == 2 else "normal"
    samples = sample(pipe, [p.text for p in prompts], concepts, settings, kind, progress=False)
    return {sampler: [s for s in samples if s.sampler == sampler] for sampler in samplers}


def sample_variants(
    pipe: StableDiffusionPipeline, residuals: Path, prompts: list[ToyPrompt], settings: SampleSettings
) -> dict[str, list[Sample]]:
    """base / normal / lag samples, each in prompt order then seed order."""
    variants = {"base": base_samples(pipe, prompts, settings)}
    concepts = load_concepts(denoiser_of(pipe), [residuals])
    try:
        both = sample(pipe, [p.text for p in prompts], concepts, settings, "both", progress=False)
    finally:
        remove_residuals(denoiser_of(pipe))
    variants["normal"] = [s for s in both if s.sampler == "normal"]
    variants["lag"] = [s for s in both if s.sampler == "lag"]
    return variants


def score_concept(
    variants: dict[str, list[Sample]],
    prompts: list[ToyPrompt],
    settings: SampleSettings,
    judge: Judge,
    scorers: Scorers | None,
    folder: Path,
    photos: Path,
) -> list[dict[str, Any]]:
    """One row per image of every variant: judge checks, border change against the base image from
    the same noise (when ``variants`` has "base"), oracle CLIP/DINO scores (when ``scorers``)."""
    expects = [p for p in prompts for _ in range(settings.num_images)]
    base_pixels = [np.asarray(s.image) for s in variants["base"]] if "base" in variants else None
    rows = []
    for variant, items in variants.items():
        files = write_samples(folder / variant, items, settings, {"variant": variant})
        oracle = evaluate_folder(folder / variant, photos, scorers=scorers)["images"] if scorers else None
        reads = read_images(judge, [np.asarray(s.image) for s in items])
        for k, (item, prompt, read) in enumerate(zip(items, expects, reads, strict=True)):
            row: dict[str, Any] = {
                "variant": variant,
                "prompt": prompt.text,
                "category": prompt.category,
                "seed": item.seed,
                "image": str(files[k].relative_to(folder)),
                **check(read, prompt.expect),
            }
            if base_pixels is not None:
                row["border_change"] = border_change(np.asarray(item.image), base_pixels[k])
            if oracle is not None:
                row.update({m: oracle[k][m] for m in ("clip_t", "clip_i", "dino_i")})
            rows.append(row)
    return rows
