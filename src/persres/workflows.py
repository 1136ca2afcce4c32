"""The library calls behind ``persres sample`` and ``persres merge`` (``info``: persres.info)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from persres.concepts import Concept, load_concepts, plan_prompts, read_concepts
from persres.errors import ConfigError, OutputExistsError
from persres.files import atomic_dir
from persres.info import describe  # noqa: F401  (``persres info``'s function lives there, torch-free)
from persres.io import load_residuals, read_residual_file
from persres.outputs import write_samples
from persres.pipeline import load_pipeline, resolve_device
from persres.residuals import fold_residuals
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
    base: str, residuals: list[str | os.PathLike[str]], device: str = "auto", precision: str = "auto"
) -> tuple[StableDiffusionPipeline, list[Concept]]:
    """The base pipeline with one or more residual files loaded into its U-Net, and their concepts."""
    read_concepts(residuals)  # a bad file fails before the model is loaded
    target = resolve_device(device)
    pipe = load_pipeline(base, sampling_dtype(precision, target), target)
    return pipe, load_concepts(pipe.unet, list(residuals))


def sample_to_folder(
    base: str,
    residuals: list[str | os.PathLike[str]],
    prompts: list[str],
    out: str | os.PathLike[str],
    settings: SampleSettings = SampleSettings(),
    sampler: Sampler = "normal",
    save_masks: bool = False,
    device: str = "auto",
    precision: str = "auto",
) -> list[Path]:
    """Sample every prompt with the residuals and write PNGs with JSON sidecars into ``out``."""
    if Path(out).exists() and not Path(out).is_dir():
        raise OutputExistsError(f"--out {out} is a file; pass a folder for the images")
    if save_masks and sampler == "normal":
        raise ConfigError("--save-masks shows LAG's masks; use it with --sampler lag or both")
    plan_prompts(prompts, read_concepts(residuals))  # placeholder errors before the model is loaded
    pipe, concepts = load_personalized(base, residuals, device, precision)
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


def merge_to_folder(base: str, residuals: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a full diffusers pipeline whose U-Net has the residuals folded into its weights.

    The result loads with plain ``StableDiffusionPipeline.from_pretrained``; prompts still use the
    identifier token (recorded in ``persres_merge.json``).
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"--out {out} already exists; merge writes a new folder, choose another path")
    read_residual_file(residuals)  # a bad file fails before the model is loaded
    pipe = load_pipeline(base, torch.float32, "cpu", as_shipped=True)
    metadata = load_residuals(pipe.unet, residuals)
    fold_residuals(pipe.unet)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        note = {
            "merged_from": str(residuals),
            "base": base,
            "token": metadata.get("token"),
            "class_word": metadata.get("class_word"),
        }
        (tmp / "persres_merge.json").write_text(json.dumps(note, indent=2) + "\n")
    return out
