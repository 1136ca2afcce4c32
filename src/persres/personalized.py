"""A base pipeline with residual files loaded into its U-Net, and sampling it into a folder: the
library call behind ``persres sample``. Each residual file is read once, and checked (with the
prompts) before the model is loaded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from persres.concepts import Concept, ResidualSource, concept_of, load_concepts, plan_prompts, read_files
from persres.errors import ConfigError
from persres.files import check_writable
from persres.outputs import write_samples
from persres.pipeline import load_pipeline, resolve_device
from persres.sampling import Sampler, SampleSettings, sample

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on a GPU, fp32 on the CPU (where half precision is slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def load_personalized(
    base: str, residuals: Sequence[ResidualSource], device: str = "auto", precision: str = "auto"
) -> tuple[StableDiffusionPipeline, list[Concept]]:
    """The base pipeline with one or more residual files loaded into its U-Net, and their concepts."""
    files = read_files(residuals)  # a bad file fails before the model is loaded
    target = resolve_device(device)
    pipe = load_pipeline(base, sampling_dtype(precision, target), target)
    return pipe, load_concepts(pipe.unet, files)


def sample_to_folder(
    base: str,
    residuals: Sequence[ResidualSource],
    prompts: list[str],
    out: str | os.PathLike[str],
    settings: SampleSettings = SampleSettings(),
    sampler: Sampler = "normal",
    save_masks: bool = False,
    device: str = "auto",
    precision: str = "auto",
) -> list[Path]:
    """Sample every prompt with the residuals and write PNGs with JSON sidecars into ``out``."""
    check_writable(out, "--out")
    if save_masks and sampler == "normal":
        raise ConfigError("--save-masks shows LAG's masks; use it with --sampler lag or both")
    files = read_files(residuals)
    plan_prompts(prompts, [concept_of(f) for f in files])  # placeholder errors before the model is loaded
    pipe, concepts = load_personalized(base, files, device, precision)
    samples = sample(pipe, prompts, concepts, settings, sampler, save_masks)
    extra = {
        "base": base,
        "concepts": [
            {"placeholder": placeholder(g, len(concepts)), **asdict(c)} for g, c in enumerate(concepts)
        ],
        "scheduler": "DDIM",
    }
    return write_samples(out, samples, settings, extra)


def placeholder(index: int, count: int) -> str:
    return "V*" if count == 1 else f"V{index + 1}*"
