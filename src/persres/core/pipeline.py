"""Load a Stable Diffusion 1.x/2.x or XL or a Flux.1 base model from a local diffusers folder or a hub id,
frozen.

The pipeline class comes from the model's ``model_index.json`` through its backbone
(``persres.backbones``); a pipeline no backbone knows is refused.

Weights are read only from safetensors (``use_safetensors=True``): no pickle is ever loaded.
Without network, set ``HF_HUB_OFFLINE=1`` so a model that is not cached fails at once instead of
retrying for minutes.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer

from persres.backbones import PIPELINE_NAMES, backbone_for_base, backbone_of, by_pipeline
from persres.backbones.folder import check_local_folder, looks_like_path, not_available_message
from persres.config import QuantizeBase
from persres.core.quantize import quantize_denoiser
from persres.core.tokens import PromptReader, reader_of, text_length
from persres.errors import ConfigError, ModelError, quote

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINES = {name: backbone.pipeline_class for name, backbone in by_pipeline().items()}
__all__ = ["looks_like_path"]  # re-exported: where a base lives is read in backbones.folder


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"`device` {quote(device)} is not one of auto, cpu, cuda, cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` {device}: no CUDA GPU is visible here; use `device` cpu or auto")
    if target.type not in ("cpu", "cuda"):
        raise ConfigError(f"`device` {quote(device)} is not one of auto, cpu, cuda, cuda:N")
    return target


def load_pipeline(
    base: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    as_shipped: bool = False,
    quantize: QuantizeBase = "no",
) -> Any:
    """The base pipeline (SD 1.x/2.x or XL, or Flux.1, from its model_index.json) with every pretrained
    weight frozen, the scheduler its backbone samples with (DDIM for the U-Nets) and without the safety
    checker (not needed to train or sample here). ``as_shipped`` keeps the pipeline's own scheduler and
    safety checker, for writing a merged pipeline that behaves like the base. The backbone fixes what its
    family needs after loading (SDXL's VAE stays in fp32 under fp16). ``quantize`` int8 gives the denoiser's
linear layers 8-bit weights before the pipeline moves to ``device`` (``persres.core.quantize``)."""
    backbone = backbone_for_base(base)
    extra = backbone.load_kwargs(as_shipped)
    try:
        pipe = backbone.pipeline_class.from_pretrained(
            os.path.expanduser(base), dtype=dtype, use_safetensors=True, **extra
        )
    except (OSError, ValueError) as exc:
        raise ModelError(not_available_message(base, exc)) from None
    backbone_of(pipe)  # refuses a pipeline without the family's denoiser
    # diffusers' encode_prompt pads every prompt to the tokenizer's model_max_length: bound it by the
    # text encoder (a tokenizer config without it reads as 1e30 in transformers 5)
    for tokenizer, encoder in text_towers(pipe):
        tokenizer.model_max_length = text_length(tokenizer, encoder.config)
    if not as_shipped:
        pipe.scheduler = backbone.sampling_scheduler(pipe)
    backbone.after_load(pipe, dtype)
    for model in (backbone.denoiser(pipe), pipe.vae, *(encoder for _, encoder in text_towers(pipe))):
        model.requires_grad_(False)
        model.eval()
    pipe.set_progress_bar_config(disable=True)
    quantize_denoiser(backbone.denoiser(pipe), quantize)
    return pipe.to(device)


def text_towers(pipe: object) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL (CLIP, CLIP) and Flux (CLIP, T5)."""
    return backbone_of(pipe).text_towers(pipe)


def prompt_readers(pipe: object) -> list[PromptReader]:
    """The text encoders that carry a prompt to the denoiser (its backbone's ``attended_towers``), each
    with its tokenizer and token limit: what a prompt's length and identifier are checked with."""
    attended = backbone_of(pipe).attended_towers(pipe)
    # a released encoder (None) leaves its tokenizer, bounded by the encoder when the pipeline was loaded
    return [reader_of(tokenizer, getattr(encoder, "config", None)) for tokenizer, encoder in attended]


def load_prompt_readers(base: str) -> list[PromptReader]:
    """``prompt_readers`` of a base folder or hub id without loading a weight: its backbone's
    ``attended_folders``' tokenizers and text encoder configs (a benchmark's prompts, checked before
    anything is trained)."""
    _check_local_folder(base)
    folder = os.path.expanduser(base)
    readers = []
    for tokenizer_folder, encoder_folder in backbone_for_base(base).attended_folders:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, subfolder=tokenizer_folder)
            config = AutoConfig.from_pretrained(folder, subfolder=encoder_folder)
        except (OSError, ValueError) as exc:
            raise ModelError(not_available_message(base, exc)) from None
        if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):  # as load_tokenizer
            missing = OSError(f"it has no tokenizer ({tokenizer_folder}/ folder)")
            raise ModelError(not_available_message(base, missing))
        readers.append(reader_of(tokenizer, config))
    return readers


def release_text_encoders(pipe: Any) -> int:
    """Drop the pipeline's text encoders (every tower's; the tokenizers stay) and free their memory; the
    number of parameters released. Whatever needs a prompt encoded afterwards (sampling) fails, so a
    caller encodes every prompt it needs first."""
    encoders = [encoder for _, encoder in text_towers(pipe) if encoder is not None]
    released = sum(p.numel() for encoder in encoders for p in encoder.parameters())
    names = [name for name, part in pipe.components.items() if any(part is e for e in encoders)]
    del encoders
    for name in names:
        setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return released


def pipeline_class(base: str) -> type[Any]:
    """The pipeline class ``model_index.json`` names (a local folder, or the hub cache)."""
    return backbone_for_base(base).pipeline_class


def load_unet_skeleton(base: str) -> torch.nn.Module:
    """The base model's denoiser (U-Net or transformer) built from its config on the meta device: its
    layers' names, kinds and shapes, without reading or allocating a weight."""
    return backbone_for_base(base).skeleton(base)


def load_tokenizer(base: str) -> CLIPTokenizer:
    """The base model's tokenizer alone, without any weights: for checks that run before a model is
    loaded (a benchmark's prompts, suggest-token). Refuses a folder or hub id that holds no tokenizer
    (transformers then quietly builds one that knows only its two special tokens)."""
    _check_local_folder(base)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(os.path.expanduser(base), subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(not_available_message(base, exc)) from None
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(not_available_message(base, OSError("it has no tokenizer (tokenizer/ folder)")))
    return tokenizer


def _check_local_folder(base: str) -> None:
    check_local_folder(base, PIPELINE_NAMES)
