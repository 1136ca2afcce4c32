"""A base model's folder (or hub cache entry) and the configs in it, read without loading a weight:
``model_index.json`` (which pipeline, hence which backbone), a component's config, the scheduler's
prediction type. Errors name the base and say what to pass instead."""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from persres.errors import ModelError, quote


def looks_like_path(base: str) -> bool:
    """A hub id is "org/name"; anything that exists, starts like a path or has more slashes is a folder."""
    return Path(base).expanduser().exists() or base.startswith((".", "/", "~")) or base.count("/") > 1


def read_model_index(base: str, supported: Collection[str]) -> dict[str, Any]:
    """The base's ``model_index.json`` (a local folder, or the hub cache)."""
    from diffusers import DiffusionPipeline

    check_local_folder(base, supported)
    try:
        return dict(DiffusionPipeline.load_config(os.path.expanduser(base)))
    except (OSError, ValueError) as exc:
        raise ModelError(not_available_message(base, exc)) from None


def pipeline_class_name(base: str) -> str | None:
    """The pipeline class ``model_index.json`` names, from a local folder or the hub cache, without diffusers
    (no network, no check): None when it cannot be read here (loading the base says why, later)."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(base).expanduser() / "model_index.json"
    if local.is_file():
        file: object = local
    else:
        try:
            file = try_to_load_from_cache(base, "model_index.json")
        except ValueError:  # not a hub id
            return None
    if not isinstance(file, (str, Path)):
        return None
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def prediction_type(base: str) -> str | None:
    """The base's scheduler prediction type, from a local folder or the hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(base).expanduser() / "scheduler" / "scheduler_config.json"
    if local.is_file():
        file: object = local
    else:
        try:
            file = try_to_load_from_cache(base, "scheduler/scheduler_config.json")
        except ValueError:  # not a hub id
            return None
    if not isinstance(file, (str, Path)):
        return None
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8")).get("prediction_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def check_local_folder(base: str, supported: Collection[str]) -> None:
    """A local ``base`` must be a diffusers pipeline folder whose index names one of ``supported``."""
    if not looks_like_path(base):
        return
    folder = Path(base).expanduser()
    if folder.is_file():
        raise ModelError(
            f"`base` {base} is a single file; persres loads diffusers folders (model_index.json, unet/ "
            "or transformer/, vae/, ...): convert single-file checkpoints with diffusers' conversion "
            "scripts first"
        )
    if not folder.is_dir():
        raise ModelError(
            f"`base` {base}: no such folder; pass a diffusers Stable Diffusion or Flux folder or a hub id"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"`base` {base} is not a diffusers pipeline folder (no model_index.json); single-file "
            "checkpoints (.ckpt/.safetensors) must first be converted to the diffusers layout"
        )
    text = index.read_text(encoding="utf-8", errors="replace")
    if not any(f'"{name}"' in text for name in supported):
        raise ModelError(
            f"`base` {base}: {index} does not describe a {' or '.join(supported)}; persres supports "
            "Stable Diffusion 1.x/2.x and XL, and Flux.1"
        )


def not_available_message(base: str, exc: BaseException) -> str:
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


def meta_component(model_class: Any, base: str, subfolder: str) -> Any:
    """``base``'s component in ``subfolder`` built by ``model_class`` from its config on the meta device:
    its layers' names, kinds and shapes, without reading or allocating a weight."""
    from accelerate import init_empty_weights

    try:
        config = model_class.load_config(os.path.expanduser(base), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise ModelError(not_available_message(base, exc)) from None
    with init_empty_weights():
        return model_class.from_config(config)
