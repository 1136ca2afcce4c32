"""Load a Stable Diffusion 1.x/2.x or XL base model from a local diffusers folder or a hub id, frozen.

The pipeline class comes from the model's ``model_index.json``: ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``; anything else is refused.

Weights are read only from safetensors (``use_safetensors=True``): no pickle is ever loaded.
Without network, set ``HF_HUB_OFFLINE=1`` so a model that is not cached fails at once instead of
retrying for minutes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import AutoConfig, CLIPTokenizer, PretrainedConfig

from persres.errors import ConfigError, ModelError, quote
from persres.tokens import text_length

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
AnyPipeline = StableDiffusionPipeline | StableDiffusionXLPipeline


def is_xl(pipe: object) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


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


def looks_like_path(base: str) -> bool:
    """A hub id is "org/name"; anything that exists, starts like a path or has more slashes is a folder."""
    return Path(base).expanduser().exists() or base.startswith((".", "/", "~")) or base.count("/") > 1


def load_pipeline(
    base: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    as_shipped: bool = False,
) -> StableDiffusionPipeline:
    """The base pipeline (SD 1.x/2.x or XL, from its model_index.json) with every pretrained weight
    frozen, DDIM as its scheduler and without the safety checker (not needed to train or sample here).
    ``as_shipped`` keeps the pipeline's own scheduler and safety checker, for writing a merged pipeline
    that behaves like the base. SDXL's VAE stays in fp32 under fp16: the stock one overflows in half
    precision (diffusers marks it ``force_upcast``)."""
    cls = pipeline_class(base)
    extra = {} if as_shipped or cls is StableDiffusionXLPipeline else {
        "safety_checker": None, "requires_safety_checker": False,
    }  # fmt: skip
    try:
        pipe = cls.from_pretrained(os.path.expanduser(base), dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(_not_available_message(base, exc)) from None
    if type(pipe) not in PIPELINES.values():
        raise ModelError(
            f"`base` {base} is a {type(pipe).__name__}, not a Stable Diffusion 1.x/2.x/XL pipeline"
        )
    # diffusers' encode_prompt pads every prompt to the tokenizer's model_max_length: bound it by the
    # text encoder (a tokenizer config without it reads as 1e30 in transformers 5)
    for tokenizer, encoder in text_towers(pipe):
        tokenizer.model_max_length = text_length(tokenizer, encoder.config)
    if not as_shipped:
        # latents are not in [-1, 1]: a config without clip_sample would wash DDIM's images out
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    if is_xl(pipe) and dtype == torch.float16:
        pipe.vae.to(torch.float32)
        log.info("SDXL: the VAE stays in fp32 (the stock SDXL VAE overflows in fp16)")
    for model in (pipe.unet, pipe.vae, *(encoder for _, encoder in text_towers(pipe))):
        model.requires_grad_(False)
        model.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def text_towers(pipe: object) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]  # type: ignore[attr-defined]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))  # type: ignore[attr-defined]
    return pairs


def pipeline_class(base: str) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """The pipeline class ``model_index.json`` names (a local folder, or the hub cache)."""
    _check_local_folder(base)
    try:
        index = StableDiffusionPipeline.load_config(os.path.expanduser(base))
    except (OSError, ValueError) as exc:
        raise ModelError(_not_available_message(base, exc)) from None
    name = index.get("_class_name", "")
    if name not in PIPELINES:
        raise ModelError(
            f"`base` {base} is a {name or 'pipeline without a class name'}; persres supports "
            f"{', '.join(PIPELINES)} (Stable Diffusion 1.x/2.x and XL)"
        )
    return PIPELINES[name]


def load_unet_skeleton(base: str) -> torch.nn.Module:
    """The base model's U-Net built from its config on the meta device: its layers' names, kinds and
    shapes, without reading or allocating a weight."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    _check_local_folder(base)
    try:
        config = UNet2DConditionModel.load_config(os.path.expanduser(base), subfolder="unet")
    except (OSError, ValueError) as exc:
        raise ModelError(_not_available_message(base, exc)) from None
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def load_tokenizer(base: str) -> CLIPTokenizer:
    """The base model's tokenizer alone, without any weights: for checks that run before a model is
    loaded (a benchmark's prompts, suggest-token). Refuses a folder or hub id that holds no tokenizer
    (transformers then quietly builds one that knows only its two special tokens)."""
    _check_local_folder(base)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(os.path.expanduser(base), subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(_not_available_message(base, exc)) from None
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(_not_available_message(base, OSError("it has no tokenizer (tokenizer/ folder)")))
    return tokenizer


def load_text_encoder_config(base: str) -> PretrainedConfig:
    """The configuration of the base model's text encoder (no weights), e.g. its number of positions."""
    _check_local_folder(base)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(base), subfolder="text_encoder")
    except (OSError, ValueError) as exc:
        raise ModelError(_not_available_message(base, exc)) from None


def _check_local_folder(base: str) -> None:
    if not looks_like_path(base):
        return
    folder = Path(base).expanduser()
    if folder.is_file():
        raise ModelError(
            f"`base` {base} is a single file; persres loads diffusers folders (model_index.json, unet/, "
            "vae/, ...): convert single-file checkpoints with diffusers' conversion scripts first"
        )
    if not folder.is_dir():
        raise ModelError(
            f"`base` {base}: no such folder; pass a diffusers Stable Diffusion folder or a hub id"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"`base` {base} is not a diffusers pipeline folder (no model_index.json); single-file "
            "checkpoints (.ckpt/.safetensors) must first be converted to the diffusers layout"
        )
    text = index.read_text(encoding="utf-8", errors="replace")
    if not any(f'"{name}"' in text for name in PIPELINES):
        raise ModelError(
            f"`base` {base}: {index} does not describe a {' or '.join(PIPELINES)}; persres supports "
            "Stable Diffusion 1.x/2.x and XL"
        )


def _not_available_message(base: str, exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    if looks_like_path(base):
        return (
            f"cannot load base model folder {base}: {first_line}. Its weights are missing or damaged; "
            "persres reads only .safetensors weights"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set and the model is not in the local cache: download it once with network, "
        "or pass a local diffusers folder"
        if offline
        else "check the hub id and your network, or pass a local diffusers folder"
    )
    return f"cannot load base model {quote(base)}: {first_line}. {hint}"
