"""A base pipeline with residual files loaded into its denoiser, and sampling it into a folder: the
library call behind ``persres sample``. Each residual file is read once, and checked (with the
prompts) before the model is loaded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from persres.backbones import backbone_of, denoiser_of
from persres.config import QuantizeBase
from persres.core.pipeline import load_pipeline, resolve_device
from persres.errors import ConfigError, quote
from persres.files import check_apart, check_writable
from persres.formats.concepts import (
    Concept,
    ResidualSource,
    concept_of,
    load_concepts,
    plan_prompts,
    read_files,
)
from persres.formats.runs import Run, peer_runs, read_from
from persres.inference.outputs import write_samples
from persres.inference.sampling import Sampler, SampleSettings, sample
from persres.methods import check_runs_on, get_method
from persres.methods.catalog import METHODS

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on a GPU, fp32 on the CPU (where half precision is slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` {quote(precision)} is not one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def load_personalized(
    base: str,
    residuals: Sequence[ResidualSource],
    device: str = "auto",
    precision: str = "auto",
    quantize: QuantizeBase = "no",
) -> tuple[StableDiffusionPipeline, list[Concept]]:
    """The base pipeline with one or more residual files loaded into its denoiser, and their concepts.
    ``quantize`` int8: the base's linear weights in 8 bits (``persres.core.quantize``)."""
    files = read_files(residuals)  # a bad file fails before the model is loaded
    target = resolve_device(device)
    pipe = load_pipeline(base, sampling_dtype(precision, target), target, quantize=quantize)
    return pipe, load_concepts(denoiser_of(pipe), files)


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
    quantize: QuantizeBase = "no",
) -> list[Path]:
    """Sample every prompt with the residuals and write PNGs with JSON sidecars into ``out``."""
    check_writable(out, "out")
    sources = [read_from(r) for r in residuals if isinstance(r, (str, os.PathLike))]
    check_apart(out, "out", [("base", base), *(("residuals", source) for source in sources)])
    if save_masks and sampler == "normal":
        raise ConfigError("`save_masks` shows LAG's masks; use it with `sampler` lag or both")
    peers = peer_runs(list(residuals))
    if peers:
        pipe, concepts = load_peer(base, peers, list(residuals), sampler, device, precision, quantize)
    else:
        files = read_files(residuals)
        plan_prompts(prompts, [concept_of(f) for f in files])  # placeholder errors before loading the model
        pipe, concepts = load_personalized(base, files, device, precision, quantize)
    samples = sample(pipe, prompts, concepts, settings, sampler, save_masks)
    extra = {
        "base": base,
        "concepts": [
            {"placeholder": placeholder(g, len(concepts)), **asdict(c)} for g, c in enumerate(concepts)
        ],
        "scheduler": type(pipe.scheduler).__name__.removesuffix("Scheduler"),  # DDIM; FlowMatchEulerDiscrete
    }
    return write_samples(out, samples, settings, extra)


def load_peer(
    base: str,
    peers: list[Run],
    sources: list[ResidualSource],
    sampler: str,
    device: str,
    precision: str,
    quantize: QuantizeBase = "no",
) -> tuple[StableDiffusionPipeline, list[Concept]]:
    """The base pipeline with a peer method's result loaded (normal sampling, one concept: LAG and
    several concepts per image are what personalized residuals bring)."""
    run = peers[0]
    if len(sources) > 1:
        raise ConfigError(
            f"{run.folder} is a {run.method} run: several concepts in one image need residuals runs; "
            "pass it alone"
        )
    if sampler != "normal":
        raise ConfigError(
            f"`sampler` {sampler} applies to residuals only; {run.folder} is a {run.method} run, which "
            "samples with `sampler` normal"
        )
    if quantize != "no" and not METHODS[run.method].trains_on_8bit_base:
        raise ConfigError(
            f"{run.folder} is a {run.method} run, whose result replaces or edits the base's weights: it "
            f"cannot be sampled on a base with 8-bit weights; use `quantize_base` no"
        )
    target = resolve_device(device)
    pipe = load_pipeline(base, sampling_dtype(precision, target), target, quantize=quantize)
    check_runs_on(run.method, backbone_of(pipe), base)
    return pipe, [get_method(run.method).load(pipe, run.result)]


def placeholder(index: int, count: int) -> str:
    return "V*" if count == 1 else f"V{index + 1}*"
