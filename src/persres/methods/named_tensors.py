"""A method's trainable tensors in a checkpoint: one safetensors file, keyed by the stable names of
``Trainable.params``, read back strictly (every name, shape and value checked before anything is
copied), so a damaged or hand-edited file is refused with its name and the tensor at fault."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from persres.errors import InputError
from persres.files import atomic_path


def save_named(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` (detached, on the CPU) to ``path`` atomically, with string metadata."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=dict(metadata))


def load_named(params: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Copy the tensors of ``path`` into ``params``: the same names, shapes, float and finite, or nothing."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise damaged(path, f"not a readable safetensors file: {exc}") from None
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise damaged(
            path, f"tensors missing: {missing[:3] or 'none'}; tensors not trained here: {extra[:3] or 'none'}"
        )
    for name, param in params.items():
        value = tensors[name]
        if value.shape != param.shape or not value.is_floating_point():
            raise damaged(
                path,
                f"tensor {name} is {value.dtype} {tuple(value.shape)}, expected float {tuple(param.shape)}",
            )
        if not torch.isfinite(value).all():
            raise damaged(path, f"tensor {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def damaged(path: Path, what: str) -> InputError:
    return InputError(
        f"checkpoint file {path} is damaged or was edited ({what}); delete its checkpoint folder to resume "
        "from the one before (from step 0 if there is none), or start again with --overwrite"
    )
