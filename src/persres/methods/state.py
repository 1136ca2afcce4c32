"""Safetensors files of the method modules: trainable tensors by name, loaded strictly, and the
concept recorded in a result file's metadata.

Shared by the methods whose checkpoint is simply "the trainable tensors" (LoRA, Textual Inversion):
written atomically, read back only when every expected tensor is there with its shape, nothing else
is, and every value is finite. Each refusal names the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from persres.concepts import Concept
from persres.errors import ConfigError, InputError
from persres.files import atomic_path


def write_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    """``tensors`` (detached, on the CPU, contiguous) with string ``metadata``, replacing ``path``."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path, overwrite=True) as tmp:
        save_file(plain, str(tmp), metadata=dict(metadata))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None


def read_tensors(path: Path, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, which must be exactly the ``expected`` names and shapes, all finite."""
    if not path.is_file():
        raise InputError(f"state file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"state file {path} is not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise InputError(
            f"state file {path} does not match the model: missing tensors {missing or 'none'}, "
            f"unexpected tensors {extra or 'none'}; it was written for another method or base model"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name]:
            raise InputError(
                f"state file {path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model needs "
                f"{tuple(expected[name])}; it was written for another base model or rank"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise InputError(
                f"state file {path}: tensor {name!r} is not finite floating point; the run that wrote it "
                "diverged or the file is damaged"
            )
    return tensors


def concept_in(path: Path, metadata: Mapping[str, str]) -> Concept:
    """The concept a result file was trained for, from the persres metadata its ``save`` wrote."""
    token, class_word = metadata.get("token"), metadata.get("class_word")
    if not token or not class_word:
        raise ConfigError(
            f"{path} records no identifier token or class word in its metadata; it was not written by "
            "persres train (files from other tools load with diffusers directly)"
        )
    return Concept(token, class_word, str(path))
