"""Base models behind one protocol: a ``Backbone`` answers every question whose answer depends on the
architecture, so training, sampling, LAG, export and the benchmark never test a pipeline's class or a
model config's fields. One module per family: ``unet.py`` (Stable Diffusion 1.x, 2.x and XL) and
``flux.py`` (Flux.1, an MMDiT transformer).

The package imports no torch until a backbone is asked for (``records`` is read by ``persres info``,
which must start fast), hence the imports inside the pickers.

A backbone owns:
- loading: the pipeline class (``pipeline_class``), its denoiser (``denoiser``: ``pipe.unet`` or
  ``pipe.transformer``), extra ``from_pretrained`` arguments and fixes after loading (SDXL's fp32 VAE
  under fp16), the scheduler persres samples with (``sampling_scheduler``: DDIM for the U-Nets, the
  shipped flow-matching Euler for Flux), the (tokenizer, text encoder) pairs and those whose positions
  the denoiser attends to (``attended_towers``, and their subfolders ``attended_folders`` for checks
  before loading: where LAG finds a concept's words, and whose tokenizers and length limits a prompt and
  an identifier are checked with: SD's CLIP, Flux's T5 and not its pooled CLIP), the default training
  resolution and `rank`, the `guidance` sampling uses when none is given (``default_guidance`` of the
  denoiser's config: classifier-free 7.5 on the U-Nets, Flux.1-dev's distilled 3.5, 1 (none) on a Flux
  model without a guidance embedding, where a given `guidance` is classifier-free), and a weightless
  ``skeleton`` of its denoiser for checks before loading;
- residuals: which layers get them (``residual_targets``, keyed by module path) and the default rank rule;
- LAG: which attention layers give the maps of a residual's block (``attention_layers``), the processor
  that captures their text-column probabilities (``capture_processor``), the block's mask laid out on the
  tokens its residual layer sees (``residual_mask``), and every text-reading attention layer for the
  methods that edit keys and values (``cross_attention_layers``);
- training: which methods train on it (``method_capability``, a capability of the method catalog), the
  training noise schedule (``training_scheduler``), a prompt's conditioning (``encode``), one batch's
  from one per image (``join_conditioning``, for `captions` and `buckets`: each image's prompt, the
  batch's pixel size), a batch's VAE posterior (``posterior``, kept for every photo with
  `cache_latents`) and a sample of it in the denoiser's latent space (``latents``: scaled, shifted),
  noise, timesteps and target (``noised``) and the denoiser call (``predict``); the loop only takes the
  MSE;
- files: the architecture record written into residual files, kohya's layer names and model version,
  and the component prefix of diffusers-format LoRA files (``diffusers_lora_prefix``; None: not written);
- the LoRA method: the layer names its adapters go on (``lora_targets``, peft ``target_modules``), as
  diffusers' DreamBooth-LoRA script for the family sets them by default.

Flux (``flux.py``) answers all of it; its LAG is in ``flux_attention.py``: joint attention over [text,
image] tokens with SDPA returns no probabilities, so the capture processor computes, beside the fused
attention, the image-query -> requested-text-key slice of the joint softmax and hands (B, heads, HW, K)
with the K column indices to the same ``lag`` hooks; a single block's ``proj_out`` sees [text, image], so
its mask gets T leading zeros (text tokens untouched).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from persres.errors import ModelError

if TYPE_CHECKING:
    import torch
    from diffusers.models.attention_processor import Attention
    from torch import nn

    from persres.backbones.vae import Posterior
    from persres.config import ResidualConfig


class ProbsHook(Protocol):
    """Where a capture processor hands each call's attention probabilities (B, heads, HW, K) of the image
    queries: all T text columns (``keys`` None, the U-Net's case) or only the text positions ``keys`` (K,)
    names, in that order (a joint attention over long text, Flux's)."""

    def __call__(self, probs: torch.Tensor, keys: torch.Tensor | None = None) -> None: ...


# pipeline class name (model_index.json's ``_class_name``) -> the family that loads it
PIPELINE_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline")
SUPPORTED = f"{', '.join(PIPELINE_NAMES)} (Stable Diffusion 1.x/2.x and XL, Flux.1)"
# pipeline class name -> the `rank` residuals train with when none is given, where it is not the paper's
# 0.05 of each layer's width (``ResidualConfig.rank``): readable without torch, because every front end
# builds its TrainConfig before loading a model. Each backbone's ``rank_default`` says the same, with why.
RANK_DEFAULTS: dict[str, float | int] = {"FluxPipeline": 21}


class Condition(Protocol):
    """What a backbone's ``encode`` returns: its own conditioning of one prompt, whose text sequence
    (``hidden``, (1, T, D)) is on the training device."""

    @property
    def hidden(self) -> torch.Tensor: ...
    def detach(self) -> Condition: ...


class Backbone(Protocol):
    """What persres asks of a base model's family; see the module's notes."""

    @property
    def name(self) -> str: ...
    @property
    def pipeline_class(self) -> type[Any]: ...
    @property
    def default_resolution(self) -> int: ...
    @property
    def rank_default(self) -> float | int: ...
    @property
    def method_capability(self) -> str | None: ...

    def default_guidance(self, denoiser_config: Mapping[str, Any]) -> float: ...
    def denoiser(self, pipe: Any) -> nn.Module: ...
    def load_kwargs(self, as_shipped: bool) -> dict[str, Any]: ...
    def after_load(self, pipe: Any, dtype: torch.dtype) -> None: ...
    def sampling_scheduler(self, pipe: Any) -> Any: ...
    def training_scheduler(self, pipe: Any) -> Any: ...
    def text_towers(self, pipe: Any) -> list[tuple[Any, Any]]: ...
    def attended_towers(self, pipe: Any) -> list[tuple[Any, Any]]: ...
    @property
    def attended_folders(self) -> tuple[tuple[str, str], ...]: ...
    def skeleton(self, base: str) -> nn.Module: ...

    def residual_targets(self, denoiser: nn.Module) -> dict[str, nn.Module]: ...
    def default_rank(self, path: str, layer: nn.Linear | nn.Conv2d, config: ResidualConfig) -> int: ...

    def attention_layers(self, denoiser: nn.Module, target: str) -> dict[str, Attention]: ...
    def capture_processor(self, hook: ProbsHook, keys: torch.Tensor, text_length: int) -> Any: ...
    def residual_mask(
        self, denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int
    ) -> torch.Tensor: ...
    def cross_attention_layers(self, denoiser: nn.Module) -> dict[str, Attention]: ...

    def encode(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> Condition: ...
    def prompt_inputs(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]: ...
    def sampling_kwargs(self, pipe: Any, guidance: float) -> dict[str, Any]: ...
    def text_inputs(self, pipe: Any, prompt: str) -> dict[str, Any]: ...
    def join_conditioning(self, conditions: Sequence[Any], size: tuple[int, int]) -> Condition: ...
    def posterior(self, pipe: Any, pixels: torch.Tensor, device: torch.device) -> Posterior: ...
    def latents(self, pipe: Any, posterior: Posterior, generator: torch.Generator) -> torch.Tensor: ...
    def noised(
        self, scheduler: Any, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    @property
    def timestep_weightings(self) -> tuple[str, ...]: ...
    def timestep_weights(
        self, scheduler: Any, steps: torch.Tensor, weighting: str
    ) -> torch.Tensor | None: ...
    def predict(
        self, pipe: Any, denoiser: nn.Module, noisy: torch.Tensor, steps: torch.Tensor, condition: Any
    ) -> torch.Tensor: ...

    def architecture(self, denoiser: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Any]: ...
    def kohya_names(self, layers: list[str]) -> dict[str, str]: ...
    def kohya_model_version(self, conv: bool, base: str | None) -> str: ...
    @property
    def diffusers_lora_prefix(self) -> str | None: ...
    @property
    def lora_targets(self) -> tuple[str, ...]: ...


def rank_default_for(base: str) -> float | int:
    """The `rank` residuals train with on ``base`` when none is given: its family's (``RANK_DEFAULTS``),
    read from its model_index.json without loading anything; the paper's 0.05 when it cannot be read."""
    from persres.backbones.folder import pipeline_class_name
    from persres.config import ResidualConfig

    return RANK_DEFAULTS.get(pipeline_class_name(base) or "", ResidualConfig.rank)


def by_pipeline() -> dict[str, Backbone]:
    """Every backbone, keyed by the name of the pipeline class that loads it."""
    from persres.backbones.flux import FLUX
    from persres.backbones.unet import SD, SDXL

    return {b.pipeline_class.__name__: b for b in (SD, SDXL, FLUX)}


def backbone_of(pipe: object) -> Backbone:
    """The backbone of a loaded pipeline, by its class; one without the family's denoiser is refused
    (by the backbone's ``denoiser``)."""
    backbone = by_pipeline().get(type(pipe).__name__)
    if backbone is None or type(pipe) is not backbone.pipeline_class:
        raise ModelError(f"`base` {base_name(pipe)} is a {type(pipe).__name__}; persres supports {SUPPORTED}")
    backbone.denoiser(pipe)
    return backbone


def denoiser_of(pipe: object) -> nn.Module:
    """The denoiser of a loaded pipeline (its U-Net or transformer), as its backbone finds it."""
    return backbone_of(pipe).denoiser(pipe)


def base_name(pipe: object) -> str:
    return getattr(pipe, "name_or_path", None) or "this pipeline"


def without_denoiser(pipe: object, what: str) -> ModelError:
    """The refusal of a pipeline of a known class that lacks its family's denoiser (``what``)."""
    return ModelError(
        f"`base` {base_name(pipe)} is a {type(pipe).__name__} without {what}; persres supports {SUPPORTED}"
    )


def default_guidance_for_base(base: str) -> float:
    """The `guidance` sampling uses on ``base`` when none is given, from its denoiser's config (read on
    the meta device: no weight is loaded)."""
    backbone = backbone_for_base(base)
    return backbone.default_guidance(backbone.skeleton(base).config)


def backbone_for_base(base: str) -> Backbone:
    """The backbone of a base folder or hub id, from its ``model_index.json``; no weight is read."""
    from persres.backbones.folder import read_model_index

    name = read_model_index(base, PIPELINE_NAMES).get("_class_name", "")
    families = by_pipeline()
    if name not in families:
        raise ModelError(
            f"`base` {base} is a {name or 'pipeline without a class name'}; persres supports {SUPPORTED}"
        )
    return families[name]


def backbone_of_denoiser(denoiser: nn.Module) -> Backbone:
    """The backbone of a denoiser (a U-Net or a Flux transformer), from its type and config."""
    from persres.backbones.flux import FLUX, is_flux_transformer
    from persres.backbones.unet import backbone_of_unet, is_unet

    if is_flux_transformer(denoiser):
        return FLUX
    if not is_unet(denoiser):
        raise ModelError(
            f"no transformer blocks (Transformer2DModel) found in {type(denoiser).__name__}; "
            "pass the U-Net of a Stable Diffusion pipeline or the transformer of a Flux pipeline"
        )
    return backbone_of_unet(denoiser)


def backbone_of_record(architecture: object) -> Backbone:
    """The backbone a residual file was made for, from the architecture it records (SD 1.x/2.x when it
    records neither Flux's denoiser nor SDXL's added conditioning)."""
    from persres.backbones.flux import FLUX
    from persres.backbones.records import is_flux_record, is_xl_config
    from persres.backbones.unet import SD, SDXL

    if is_flux_record(architecture):
        return FLUX
    return SDXL if isinstance(architecture, dict) and is_xl_config(architecture) else SD
