"""Safetensors files of the methods: tensors keyed by stable names (``Trainable.params``' keys, or a
token), written atomically and read back strictly - every name, shape and value checked before
anything is copied, so a damaged or hand-edited file is refused with its name and the tensor at
fault - and the concept a result file records in its metadata."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from persres.errors import ConfigError, InputError
from persres.files import atomic_path
from persres.formats.concepts import Concept
from persres.methods.concept_json import check_base
from persres.methods.protocol import Trainable


def save_named(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> Path:
    """Write ``tensors`` (detached, on the CPU) to ``path`` atomically, with string metadata."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path, overwrite=True) as tmp:
        save_file(plain, str(tmp), metadata=dict(metadata))
    return Path(path)


def read_named(path: str | os.PathLike[str], expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: exactly the ``expected`` names and shapes, floating point and finite."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise InputError(
            f"{path} does not match the model: missing tensors {missing[:3] or 'none'}, unexpected tensors "
            f"{extra[:3] or 'none'}; it was written for another method or base model"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name] or not tensor.is_floating_point():
            raise InputError(
                f"{path}: tensor {name} is {tensor.dtype} of shape {tuple(tensor.shape)}, the model needs "
                f"float of shape {tuple(expected[name])}; it was written for another base model or rank"
            )
        if not torch.isfinite(tensor).all():
            raise InputError(
                f"{path}: tensor {name} holds NaN or infinite values (not finite): the run that wrote it "
                "diverged or the file is damaged"
            )
    return tensors


def load_named(params: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Copy the tensors of ``path`` into ``params`` (same names and shapes), or refuse and copy nothing."""
    tensors = read_named(path, {name: param.shape for name, param in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


class NamedTensorState:
    """``save_state`` / ``load_state`` for the methods whose checkpoint is just their trainable tensors by
    name (DreamBooth, Custom Diffusion, Perfusion): one strict file, tagged with the method's name."""

    name: str

    def save_state(self, trainable: Trainable, path: Path, metadata: dict[str, str]) -> None:
        save_named(trainable.params, path, {**metadata, "method": self.name})

    def load_state(self, trainable: Trainable, path: Path) -> None:
        load_named(trainable.params, path)


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from None


def concept_in(path: Path, metadata: Mapping[str, str], unet: nn.Module) -> Concept:
    """The concept a result file was trained for, from the persres metadata its ``save`` wrote; a file
    made for another architecture than ``unet``'s is refused (``check_base``)."""
    token, class_word = metadata.get("token"), metadata.get("class_word")
    if not token or not class_word:
        raise ConfigError(
            f"{path} records no identifier token or class word in its metadata; it was not written by "
            "persres train (files from other tools load with diffusers directly)"
        )
    check_base(path, metadata, unet)
    return Concept(token, class_word, str(path))
