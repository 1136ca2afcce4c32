"""Base models behind one protocol: a ``Backbone`` answers every question whose answer depends on the
architecture, so training, sampling, LAG, export and the benchmark never test a pipeline's class or a
model config's fields. One module per family; today ``unet.py`` (Stable Diffusion 1.x, 2.x and XL).

The package imports no torch until a backbone is asked for (``records`` is read by ``persres info``,
which must start fast), hence the imports inside the pickers.

A backbone owns:
- loading: the pipeline class (``pipeline_class``), extra ``from_pretrained`` arguments and fixes after
  loading (SDXL's fp32 VAE under fp16), the (tokenizer, text encoder) pairs, the default training
  resolution, and a weightless ``skeleton`` of its denoiser for checks before loading;
- residuals: which layers get them (``residual_targets``, keyed by module path) and the default rank rule;
- LAG: which attention layers give the maps of a residual's block (``attention_layers``), the processor
  that captures their text-column probabilities (``capture_processor``), the block's mask laid out on the
  tokens its residual layer sees (``residual_mask``), and every text-reading attention layer for the
  methods that edit keys and values (``cross_attention_layers``);
- training: a prompt's conditioning (``encode``), the latents of a batch, noise, timesteps and target
  (``noised``) and the denoiser call (``predict``); the loop only takes the MSE;
- files: the architecture record written into residual files, kohya's layer names and model version.

What a transformer family (Flux) will need, and where it fits without touching the training loop:
- no U-Net: its denoiser is ``pipe.transformer``; ``skeleton`` builds a ``FluxTransformer2DModel``.
- residual targets: ``transformer_blocks.i.attn.to_out.0`` (joint blocks) and
  ``single_transformer_blocks.i.proj_out``; both Linear, so ``ResidualProjOut`` wraps them as is, and
  their widths and default rank come from ``residual_targets``/``default_rank``.
- LAG: joint attention over [text, image] tokens and SDPA that returns no probabilities; all of it is in
  ``flux_attention.py`` (``attention_layers``, ``FluxCaptureProcessor``, ``residual_mask``): the capture
  computes, beside the fused attention, the image-query -> requested-text-key slice of the joint softmax
  and hands (B, heads, HW, K) with the K column indices to the same ``lag`` hooks; a single block's
  ``proj_out`` sees [text, image], so its mask gets T leading zeros (text tokens untouched).
- conditioning: the T5 sequence, the pooled CLIP embedding, text position ids and the guidance embedding;
  ``encode`` returns its own conditioning object (``Conditioning`` here is the U-Net's).
- training: flow matching, velocity target (noise - latents) at shifted sigmas; packed 2x2 latents with
  image position ids. ``latents`` (VAE shift and scale, packing), ``noised`` (its timestep sampler and
  target) and ``predict`` (the transformer call with ids and guidance) carry all of it.
- files: kohya / BFL names ``double_blocks.i.img_attn.proj`` and ``single_blocks.i.linear2`` from
  ``kohya_names``; its architecture record and ``kohya_model_version`` ("flux1").
- loading: ``FluxPipeline``; ``default_resolution`` 1024.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from persres.errors import ModelError

if TYPE_CHECKING:
    import torch
    from diffusers.models.attention_processor import Attention
    from torch import nn

    from persres.config import ResidualConfig


class ProbsHook(Protocol):
    """Where a capture processor hands each call's attention probabilities (B, heads, HW, K) of the image
    queries: all T text columns (``keys`` None, the U-Net's case) or only the text positions ``keys`` (K,)
    names, in that order (a joint attention over long text, Flux's)."""

    def __call__(self, probs: torch.Tensor, keys: torch.Tensor | None = None) -> None: ...


# pipeline class name (model_index.json's ``_class_name``) -> the family that loads it
PIPELINE_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SUPPORTED = f"{', '.join(PIPELINE_NAMES)} (Stable Diffusion 1.x/2.x and XL)"


class Backbone(Protocol):
    """What persres asks of a base model's family; see the module's notes."""

    @property
    def name(self) -> str: ...
    @property
    def pipeline_class(self) -> type[Any]: ...
    @property
    def default_resolution(self) -> int: ...
    @property
    def works_for_every_method(self) -> bool: ...

    def load_kwargs(self, as_shipped: bool) -> dict[str, Any]: ...
    def after_load(self, pipe: Any, dtype: torch.dtype) -> None: ...
    def text_towers(self, pipe: Any) -> list[tuple[Any, Any]]: ...
    def skeleton(self, base: str) -> nn.Module: ...

    def residual_targets(self, denoiser: nn.Module) -> dict[str, nn.Module]: ...
    def default_rank(self, path: str, layer: nn.Linear | nn.Conv2d, config: ResidualConfig) -> int: ...

    def attention_layers(self, denoiser: nn.Module, target: str) -> dict[str, Attention]: ...
    def capture_processor(self, hook: ProbsHook, keys: torch.Tensor, text_length: int) -> Any: ...
    def residual_mask(
        self, denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int
    ) -> torch.Tensor: ...
    def cross_attention_layers(self, denoiser: nn.Module) -> dict[str, Attention]: ...

    def encode(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> Any: ...
    def latents(
        self, pipe: Any, pixels: torch.Tensor, device: torch.device, generator: torch.Generator
    ) -> torch.Tensor: ...
    def noised(
        self, scheduler: Any, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def predict(
        self, pipe: Any, denoiser: nn.Module, noisy: torch.Tensor, steps: torch.Tensor, condition: Any
    ) -> torch.Tensor: ...

    def architecture(self, denoiser: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Any]: ...
    def kohya_names(self, layers: list[str]) -> dict[str, str]: ...
    def kohya_model_version(self, conv: bool, base: str | None) -> str: ...


def by_pipeline() -> dict[str, Backbone]:
    """Every backbone, keyed by the name of the pipeline class that loads it."""
    from persres.backbones.unet import SD, SDXL

    return {b.pipeline_class.__name__: b for b in (SD, SDXL)}


def backbone_of(pipe: object) -> Backbone:
    """The backbone of a loaded pipeline, by its class; one without the family's denoiser is refused."""
    from persres.backbones.unet import is_unet

    backbone = by_pipeline().get(type(pipe).__name__)
    known = backbone is not None and type(pipe) is backbone.pipeline_class
    if backbone is None or not known or not is_unet(getattr(pipe, "unet", None)):
        base = getattr(pipe, "name_or_path", None) or "this pipeline"
        lacks = " without a U-Net" if known else ""
        raise ModelError(f"`base` {base} is a {type(pipe).__name__}{lacks}; persres supports {SUPPORTED}")
    return backbone


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
    """The backbone of a denoiser (a U-Net), from its type and config."""
    from persres.backbones.unet import backbone_of_unet, is_unet

    if not is_unet(denoiser):
        raise ModelError(
            f"no transformer blocks (Transformer2DModel) found in {type(denoiser).__name__}; "
            "pass the U-Net of a Stable Diffusion 1.x/2.x pipeline"
        )
    return backbone_of_unet(denoiser)


def backbone_of_record(architecture: object) -> Backbone:
    """The backbone a residual file was made for, from the architecture it records (SD 1.x/2.x when it
    records no added conditioning)."""
    from persres.backbones.records import is_xl_config
    from persres.backbones.unet import SD, SDXL

    return SDXL if isinstance(architecture, dict) and is_xl_config(architecture) else SD
