"""Residual files: safetensors only, loaded strictly.

Layout of ``residuals.safetensors``: for each wrapped layer two fp32 tensors,
``{module path}.A`` (m_out x r, the up factor) and ``{module path}.B`` (r x m_in, the down factor),
e.g. ``down_blocks.0.attentions.0.proj_out.A``. Metadata (all strings): ``format``,
``format_version`` and whatever the caller adds (base model, token, class word, configs as JSON).
Any missing, extra or mis-shaped tensor is an error that names it; the header's rules (format,
metadata, factor pairs, dtypes, shapes) live in ``persres.formats.header``, and reading also refuses factors
that are not finite (a diverged run) or whose product is absurd (``check_factors``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from persres.backbones import backbone_of_denoiser
from persres.backbones.records import describe
from persres.config import ResidualConfig
from persres.core.residuals import add_residuals, find_proj_outs, find_residuals, residual_parameters
from persres.errors import ConfigError, ResidualFileError
from persres.files import atomic_path
from persres.formats.header import FORMAT_NAME, FORMAT_VERSION, read_residual_header
from persres.formats.runfolder import residual_file

# The largest change |A B| a residual may make to any weight. Stable Diffusion's proj_out weights are of
# order 0.1 (below 10 in every release), and training moves them by a fraction of that; a change of 1e4
# is no training's but a damaged or hand-made file's, which would sample black or NaN images. One
# absolute bound, so that every command (import, sample, merge, export, resume) refuses the same files
# whether or not it has the base's weights at hand.
MAX_CHANGE = 1e4


@dataclass(frozen=True)
class ResidualFile:
    """The contents of a residual file: factors keyed as saved, and string metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, B), sorted by module path."""
        names = sorted({key.rpartition(".")[0] for key in self.tensors})
        return {layer: (self.tensors[f"{layer}.A"], self.tensors[f"{layer}.B"]) for layer in names}

    def json_field(self, key: str) -> Any:
        return json.loads(self.metadata[key]) if key in self.metadata else None


def save_residuals(
    unet: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False, **metadata: Any
) -> Path:
    """Write the residual factors of ``unet`` to ``path`` atomically.

    Extra keyword arguments become metadata (strings kept, anything else JSON-encoded).
    An existing file is replaced only with ``overwrite=True``.
    """
    params = residual_parameters(unet)
    if not params:
        raise ConfigError("this U-Net has no residuals to save; call add_residuals(unet) first")
    layers = {key.rpartition(".")[0] for key in params}
    factors = {layer: (params[f"{layer}.A"], params[f"{layer}.B"]) for layer in sorted(layers)}
    header = {"architecture": architecture(unet)}
    for key, value in metadata.items():
        header[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return write_residual_file(factors, path, header, overwrite=overwrite)


def write_residual_file(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str],
    overwrite: bool = False,
) -> Path:
    """Write (A, B) per module path as a residual file, atomically, with ``metadata`` (strings) and the
    format's name and version."""
    tensors = {}
    for layer, (a, b) in factors.items():
        tensors[f"{layer}.A"] = a.detach().to(device="cpu", dtype=torch.float32).contiguous()
        tensors[f"{layer}.B"] = b.detach().to(device="cpu", dtype=torch.float32).contiguous()
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), **metadata}
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def architecture(unet: nn.Module) -> str:
    """What a residual file needs of its base beyond layer shapes, as its backbone records it (JSON)."""
    return json.dumps(backbone_of_denoiser(unet).architecture(unet, find_proj_outs(unet)), sort_keys=True)


def family(recorded: str | None) -> str:
    """A recorded architecture by name, e.g. "SD 1.x (proj_out conv, text width 768)"."""
    return describe(recorded)


def read_residual_file(path: str | os.PathLike[str]) -> ResidualFile:
    """Read and check a residual file without a model: its header (``persres.formats.header``), then the
    factors, which must be finite; they load as fp32 whatever float type they were saved in."""
    header = read_residual_header(residual_file(path))
    try:
        with safe_open(str(header.path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ResidualFileError(
            f"{header.path} is not a readable safetensors file ({exc}); persres reads and writes residuals "
            "only as .safetensors"
        ) from None
    tensors = {key: tensor.float() for key, tensor in tensors.items()}
    check_factors(header.path, tensors)
    return ResidualFile(header.path, tensors, header.metadata)


def check_factors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every factor finite, and every layer's change A B at most ``MAX_CHANGE`` in magnitude."""
    for key, tensor in sorted(tensors.items()):
        if not torch.isfinite(tensor).all():
            layer, _, factor = key.rpartition(".")
            raise ResidualFileError(
                f"{path}: layer {layer} has NaN or infinite values in factor {factor}: the training "
                "run that wrote it diverged. Retrain (e.g. with a lower `lr`) or use an earlier checkpoint "
                "(its run folder's checkpoints/step-NNNNNN/residuals.safetensors)"
            )
    for layer in sorted({key.rpartition(".")[0] for key in tensors}):
        a, b = tensors[f"{layer}.A"].double(), tensors[f"{layer}.B"].double()  # (m, r), (r, m): no overflow
        change = (a @ b).abs().max().item() if a.numel() and b.numel() else 0.0
        if not change <= MAX_CHANGE:
            raise ResidualFileError(
                f"{path}: layer {layer} changes its weights by up to {change:.3g} (A B), more than "
                f"{MAX_CHANGE:g}: no training makes that (the images would be black or NaN); the file is "
                "damaged or hand-made. Use the file as train wrote it, or retrain"
            )


def load_residuals(unet: nn.Module, path: str | os.PathLike[str]) -> dict[str, str]:
    """Load a residual file into ``unet`` strictly; adds the wrappers if ``unet`` has none yet.

    Returns the file's metadata. Raises ``ResidualFileError`` naming the layer (and both shapes)
    when the file was made for another architecture.
    """
    loaded = read_residual_file(path)
    layers = loaded.layers()
    check_architecture(loaded, unet)  # first: it names both models (SD 1.x vs SDXL), the layers follow
    check_fits(loaded, find_proj_outs(unet))
    wrappers = find_residuals(unet)
    if not wrappers:
        ranks = {layer: a.shape[1] for layer, (a, _) in layers.items()}
        wrappers = add_residuals(unet, ResidualConfig(), ranks=ranks)
    for layer, (a, b) in layers.items():
        wrapper = wrappers[layer]
        if wrapper.A.shape != a.shape:
            raise ResidualFileError(
                f"{loaded.path}: layer {layer} has rank {a.shape[1]} in the file but {wrapper.rank} in the "
                "model; call remove_residuals(unet) before loading"
            )
        if wrapper.merged:
            raise ResidualFileError(f"{layer} is merged; unmerge_residuals(unet) before loading new factors")
        with torch.no_grad():
            wrapper.A.copy_(a)
            wrapper.B.copy_(b)
    return loaded.metadata


def architecture_mismatch(recorded: str | None, unet: nn.Module) -> str | None:
    """"made for SD 1.x (...), but this base model is SDXL (...)" when a recorded architecture is not
    ``unet``'s; None when it is, or when none is recorded (results of earlier versions)."""
    if recorded is None:
        return None
    try:
        fields = json.loads(recorded)
    except ValueError:
        fields = None
    mine = architecture(unet)
    if fields == json.loads(mine):
        return None
    return f"was made for {family(recorded)}, but this base model is {family(mine)}"


def check_architecture(loaded: ResidualFile, unet: nn.Module) -> None:
    """The file's recorded architecture (proj_out kind, text width) matches the model's."""
    mismatch = architecture_mismatch(loaded.metadata.get("architecture"), unet)
    if mismatch is not None:
        raise ResidualFileError(
            f"{loaded.path} {mismatch}. Use the base model the file was trained on "
            f"({loaded.metadata.get('base_model', 'unknown')})"
        )


def check_fits(loaded: ResidualFile, proj_outs: Mapping[str, nn.Module]) -> None:
    """Every layer of the file exists in the model with matching width, and vice versa."""
    layers = loaded.layers()
    missing = sorted(set(proj_outs) - set(layers))
    extra = sorted(set(layers) - set(proj_outs))
    if extra or missing:
        raise ResidualFileError(
            f"{loaded.path} was made for another architecture: layers in the file but not in the model: "
            f"{extra or 'none'}; layers in the model but not in the file: {missing or 'none'}. "
            f"Use the base model the file was trained on ({loaded.metadata.get('base_model', 'unknown')})"
        )
    for layer, (a, b) in layers.items():
        weight = proj_outs[layer].weight
        out_features, in_features = weight.shape[:2]
        if a.shape[0] != out_features or b.shape[1] != in_features or a.shape[1] != b.shape[0]:
            raise ResidualFileError(
                f"{loaded.path}: layer {layer} does not fit: the file has A {tuple(a.shape)} and B "
                f"{tuple(b.shape)}, the model's proj_out weight is {tuple(weight.shape)} "
                f"(needs A ({out_features}, r) and B (r, {in_features})). Use the base model the file was "
                f"trained on ({loaded.metadata.get('base_model', 'unknown')})"
            )
