"""Sampling with personalized residuals: normal (residuals everywhere) or LAG (only where the
concept's cross-attention is), or both from the same noise.

Image j of every prompt is drawn from seed ``seed + j`` with a CPU generator, so the same seed gives
the same image on any run, and different prompts and samplers with the same seed start from the same
noise. ``V*`` (one concept) or ``V1*``, ``V2*`` ... (several) stand for the concepts' identifiers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from persres.backbones import backbone_of, denoiser_of
from persres.config import SampleSettings
from persres.core.lag import LagState, localized
from persres.core.pipeline import prompt_readers, text_towers
from persres.core.residuals import find_residuals
from persres.core.tokens import PromptReader, check_token
from persres.errors import ConfigError, quote
from persres.formats.concepts import (
    Concept,
    PromptPlan,
    check_prompt_length,
    concept_columns,
    plan_prompts,
)
from persres.quiet import LENGTH_EMITTER, LENGTH_NOTICE, message_hidden

log = logging.getLogger(__name__)

TRUNCATION_NOTICE = "The following part of your input was truncated"  # diffusers' (0.42) encode_prompt

Sampler = Literal["normal", "lag", "both"]
SAMPLERS = ("normal", "lag", "both")
PromptInputs = dict[str, Any]  # the pipeline call's prompt: {"prompt": text} or its embeddings
__all__ = ["SAMPLERS", "Sample", "SampleSettings", "Sampler", "generate", "sample"]


@dataclass
class Sample:
    prompt: str  # as given, with V*
    expanded: str  # as fed to the text encoder
    seed: int
    sampler: str  # "normal" or "lag"
    image: Image.Image
    masks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> block -> (1, G, HW)
    latent_size: tuple[int, int] = (0, 0)  # (h, w) of the latents, to lay masks out spatially
    guidance: float | None = None  # the guidance it was drawn with (the base's default when none was given)


def sample(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    concepts: list[Concept],
    settings: SampleSettings = SampleSettings(),
    sampler: Sampler = "normal",
    save_masks: bool = False,
    progress: bool = True,
    encoded: Mapping[str, PromptInputs] | None = None,
) -> list[Sample]:
    """Generate ``settings.num_images`` images per prompt with the concepts loaded in the pipeline's
    denoiser (its U-Net or transformer).

    ``sampler="both"`` returns a normal and a LAG image for every prompt and seed, in that order.
    ``encoded``: the prompts' embeddings made by ``encode_prompts`` before the text encoders were
    released (`release_text_encoders`), used instead of the pipeline's encoders.
    ``settings.guidance`` None: the base family's (``Backbone.default_guidance``), recorded in each
    ``Sample``.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {quote(sampler)} is not one of {', '.join(SAMPLERS)}")
    plans = plan_prompts(prompts, concepts)
    for tokenizer, _ in text_towers(pipe):  # a concept bound to a special token would be in every padding
        for concept in concepts:
            check_token(tokenizer, concept.token, new=False)
    readers = prompt_readers(pipe)  # the positions the denoiser attends to and LAG reads (Flux: T5's)
    for plan in plans:  # every sampler: diffusers would cut a long prompt with only a hidden warning
        for reader in readers:
            check_prompt_length(reader, plan, concepts)
    kinds = ["normal", "lag"] if sampler == "both" else [sampler]
    if "lag" in kinds:
        check_localizable(pipe)
    columns = {plan.prompt: prompt_columns(readers, plan, concepts, "lag" in kinds) for plan in plans}
    samples = []
    with tqdm(
        total=len(plans) * settings.num_images * len(kinds), desc="sampling", disable=not progress
    ) as bar:
        for plan in plans:
            for j in range(settings.num_images):
                for kind in kinds:
                    state = LagState(columns[plan.prompt][None], record=save_masks) if kind == "lag" else None
                    inputs = prompt_inputs(pipe, plan, encoded)
                    samples.append(generate(pipe, plan, settings.seed + j, settings, state, inputs))
                    bar.update()
    return samples


def encode_prompts(
    pipe: StableDiffusionPipeline, prompts: list[str], concepts: list[Concept]
) -> dict[str, PromptInputs]:
    """Each prompt's pipeline inputs as embeddings (V* expanded to the identifier), encoded now, for
    ``sample``'s ``encoded`` once the text encoders are released."""
    backbone, device = backbone_of(pipe), pipe._execution_device
    return {
        plan.expanded: backbone.prompt_inputs(pipe, plan.expanded, device)
        for plan in plan_prompts(prompts, concepts)
    }


def prompt_inputs(
    pipe: StableDiffusionPipeline, plan: PromptPlan, encoded: Mapping[str, PromptInputs] | None
) -> PromptInputs:
    """The pipeline call's prompt: its embeddings when they were encoded before, else its text."""
    if encoded is not None and plan.expanded in encoded:
        return encoded[plan.expanded]
    if any(encoder is None for _, encoder in text_towers(pipe)):
        raise ConfigError(
            f"the text encoders are released (`release_text_encoders`) and {plan.prompt!r} was not encoded "
            "before; sample it from the run's result afterwards"
        )
    return backbone_of(pipe).text_inputs(pipe, plan.expanded)


def check_localizable(pipe: StableDiffusionPipeline) -> None:
    """Ask the backbone for the attention layers of every residual before any image is drawn: a residual
    on a layer LAG cannot place is refused here in one line."""
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    for target in find_residuals(denoiser):
        backbone.attention_layers(denoiser, target)


def prompt_columns(
    readers: list[PromptReader], plan: PromptPlan, concepts: list[Concept], require: bool
) -> torch.Tensor:
    """Each concept's token columns, located in the ids of every tokenizer (SDXL has two, whose
    hidden states sit side by side per position): a column of either counts."""
    found = [concept_columns(r.tokenizer, plan, concepts, require, r.limit) for r in readers]
    width = max(c.shape[1] for c in found)
    padded = [torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in found]
    return torch.stack(padded).amax(dim=0)


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    plan: PromptPlan,
    seed: int,
    settings: SampleSettings,
    lag: LagState | None,
    inputs: PromptInputs | None = None,
) -> Sample:
    """One image; with ``lag`` the residuals apply only inside the concepts' attention masks. ``inputs``:
    the prompt as the pipeline takes it (``prompt_inputs``), its text by default; ``settings.guidance``
    None: the base family's (``Backbone.default_guidance``)."""
    backbone = backbone_of(pipe)
    settings = settings.with_guidance(backbone.default_guidance(backbone.denoiser(pipe).config))
    assert settings.guidance is not None
    generator = torch.Generator().manual_seed(seed)
    scope = localized(denoiser_of(pipe), lag) if lag is not None else contextlib.nullcontext()
    # check_prompt_length has warned of a cut, quoting the prompt briefly: diffusers repeats all of it, and
    # transformers warns of the untruncated prompt diffusers tokenizes to find it (Flux: CLIP's pooled cut)
    cut = message_hidden(type(pipe).__module__, TRUNCATION_NOTICE)
    with scope, cut, message_hidden(LENGTH_EMITTER, LENGTH_NOTICE):
        result = pipe(
            **(inputs if inputs is not None else backbone.text_inputs(pipe, plan.expanded)),
            num_inference_steps=settings.steps,
            **backbone.sampling_kwargs(pipe, settings.guidance),
            height=settings.height,
            width=settings.width,
            generator=generator,
            output_type="pil",
            callback_on_step_end=lag.on_step_end if lag is not None else None,
        )
    masks = lag.records if lag is not None else {}
    image = result.images[0]
    latent = (image.height // pipe.vae_scale_factor, image.width // pipe.vae_scale_factor)
    kind = "lag" if lag else "normal"
    return Sample(plan.prompt, plan.expanded, seed, kind, image, masks, latent, settings.guidance)
