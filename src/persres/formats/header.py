"""What a residual file must be, checked from its safetensors header alone (standard library only).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data.
The JSON maps each tensor name to ``{"dtype": "F32", "shape": [m, r], "data_offsets": [begin, end]}``
(offsets into the data) and ``__metadata__`` to string pairs. Reading only the header lets
``persres info`` answer without importing torch, and the rules here are the ones
``io.read_residual_file`` applies before it loads any tensor: they live once.

A residual file: metadata ``format`` = ``persres.residuals``, ``format_version`` = 1, JSON where JSON
is written (``architecture``, ``rank_config``, ``train_config``), an integer ``step``; tensors
``{module path}.A`` (m, r) and ``{module path}.B`` (r, m), in pairs, floating point, rank r >= 1.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from persres import readback
from persres.backbones.records import architecture_problem as added_conditioning_problem
from persres.config import ResidualConfig, TrainConfig, typed_values
from persres.errors import ConfigError, ResidualFileError, quote

FORMAT_NAME = "persres.residuals"  # the file format's name, not a module: never changes
FORMAT_VERSION = 1
FACTORS = ("A", "B")
JSON_FIELDS = ("architecture", "rank_config", "train_config")  # JSON objects, as train writes them
INTEGER_FIELDS = ("format_version", "step")
PROJ_OUT_KINDS = ("conv", "linear", "conv/linear")  # the kinds of proj_out io.architecture finds
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
EDITED = "the file's metadata is damaged or was edited by hand; use the file as train wrote it"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, F16, BF16, I64, BOOL, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ResidualHeader:
    """A checked residual file's header: string metadata and each tensor's dtype and shape."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    def layers(self) -> dict[str, tuple[TensorInfo, TensorInfo]]:
        """Module path -> (A, B), sorted by module path."""
        tensors = self.tensors
        return {layer: (tensors[f"{layer}.A"], tensors[f"{layer}.B"]) for layer in layer_names(self)}


def read_residual_header(path: str | os.PathLike[str]) -> ResidualHeader:
    """Read and check a residual file's header: format, version, metadata, factor pairs and shapes. A run
    folder is found by ``runfolder.residual_file`` first (this module knows files, not runs)."""
    file = Path(path)
    metadata, tensors = read_safetensors_header(file)
    header = ResidualHeader(file, metadata, tensors)
    check_metadata(header)
    layer_names(header)
    return header


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The metadata and tensor table of a safetensors file, checked against the file's size."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("no valid header length in its first 8 bytes")
            table = json.loads(handle.read(length).decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("its header is not a JSON object")
        metadata = table.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("its __metadata__ is not a map of strings")
        tensors = _tensor_table(table, size - 8 - length)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ResidualFileError(
            f"{path} is not a safetensors file ({exc}); persres reads and writes residuals only "
            "as .safetensors"
        ) from None
    return metadata, tensors


def _tensor_table(table: dict[str, object], data_bytes: int) -> dict[str, TensorInfo]:
    """Each entry's dtype and shape; its data must fill the data section exactly, in order."""
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in table.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r} has a malformed dtype, shape or data_offsets")
        info = TensorInfo(dtype, tuple(shape))
        if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != info.numel * DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: {offsets} do not hold {dtype} {list(shape)}")
        tensors[name] = info
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end or stop < begin:
            raise ValueError("tensor data offsets overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the header describes {end} bytes of tensor data, the file holds {data_bytes}")
    return tensors


def _ints(value: object) -> bool:
    """A list of non-negative integers (JSON's true/false are not sizes)."""
    if not isinstance(value, list):
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def check_metadata(header: ResidualHeader) -> None:
    """Format and version first (another file type, another persres), then each field persres reads."""
    path, metadata = header.path, header.metadata
    found = metadata.get("format")
    if found != FORMAT_NAME:
        raise ResidualFileError(
            f"{path} is a safetensors file but not a persres residual file (metadata format is "
            f"{'missing' if found is None else quote(found)}, expected {FORMAT_NAME!r})"
        )
    if "format_version" not in metadata:
        raise ResidualFileError(f"{path} records no format_version; {EDITED}")
    for key in INTEGER_FIELDS:
        value = metadata.get(key)
        if value is not None and not _count(value):
            raise ResidualFileError(f"{path}: metadata {key} is {quote(value)}, not an integer; {EDITED}")
    version = int(metadata["format_version"])
    if version != FORMAT_VERSION:
        hint = "Upgrade persres to read it" if version > FORMAT_VERSION else "no persres wrote it"
        raise ResidualFileError(
            f"{path} has format version {version}; this persres reads version {FORMAT_VERSION}. {hint}"
        )
    for key in JSON_FIELDS:
        if key in metadata:
            problem = _json_field_problem(key, metadata[key])
            if problem:
                raise ResidualFileError(f"{path}: metadata {key} {problem}; {EDITED}")


def _count(text: str) -> bool:
    """A non-negative whole number of at most ``readback.MAX_DIGITS`` digits."""
    try:
        return readback.integer(text) >= 0
    except ValueError:
        return False


def _json_field_problem(key: str, text: str) -> str | None:
    """What is wrong with a JSON field: not standard JSON, not an object, or not what persres writes
    there (``persres.formats.io.architecture``, a ``ResidualConfig``, a ``TrainConfig``'s settings)."""
    try:
        value = readback.loads(text)
    except ValueError as exc:
        return f"is {exc}"
    if not isinstance(value, dict):
        return f"is {quote(text)}, not a JSON object"
    if key == "architecture":
        return _architecture_problem(value)
    try:
        if key == "rank_config":
            ResidualConfig(**value)
        if key == "train_config":  # the settings this persres knows; a later one may add settings
            typed_values(TrainConfig, value)
    except (ConfigError, TypeError) as exc:
        return f"is not a {key.replace('_', ' ')} persres writes ({exc})"
    return None


def _architecture_problem(value: dict[str, object]) -> str | None:
    """``{"proj_out": "conv" | "linear", "cross_attention_dim": int}`` and what the U-Net backbone adds."""
    proj_out, width = value.get("proj_out"), value.get("cross_attention_dim")
    if proj_out not in PROJ_OUT_KINDS:
        return f"has proj_out {readback.shown(proj_out)}, not one of {', '.join(PROJ_OUT_KINDS)}"
    if width is not None and (type(width) is not int or width < 1):
        return f"has cross_attention_dim {readback.shown(width)}, not a positive whole number"
    return added_conditioning_problem(value)  # the backbone's part of the record


def layer_names(header: ResidualHeader) -> list[str]:
    """The layers of a residual file, sorted; every tensor is one factor of a complete, consistent pair."""
    path = header.path
    layers: dict[str, set[str]] = {}
    for key, info in header.tensors.items():
        layer, _, factor = key.rpartition(".")
        if factor not in FACTORS or not layer:
            raise ResidualFileError(f"{path}: unexpected tensor {key!r}; keys must end in .A or .B")
        if info.dtype not in FLOAT_DTYPES:
            raise ResidualFileError(
                f"{path}: tensor {key!r} has dtype {info.dtype}; residual factors are floating point "
                f"({', '.join(FLOAT_DTYPES)}). The file was not written by persres or was edited"
            )
        if len(info.shape) != 2:
            raise ResidualFileError(
                f"{path}: tensor {key!r} has shape {list(info.shape)}; residual factors are matrices, "
                "A (m, r) and B (r, m). The file is damaged"
            )
        layers.setdefault(layer, set()).add(factor)
    for layer, factors in layers.items():
        if factors != set(FACTORS):
            missing = sorted(set(FACTORS) - factors)
            raise ResidualFileError(f"{path}: layer {layer} lacks factor(s) {missing}; the file is damaged")
        _check_rank(path, layer, header.tensors)
    if not layers:
        raise ResidualFileError(f"{path} holds no residual tensors")
    return sorted(layers)


def _check_rank(path: Path, layer: str, tensors: Mapping[str, TensorInfo]) -> None:
    a, b = tensors[f"{layer}.A"].shape, tensors[f"{layer}.B"].shape
    if a[1] != b[0] or min(a + b) < 1:
        raise ResidualFileError(
            f"{path}: layer {layer} has A {list(a)} and B {list(b)}; A (m, r) and B (r, m) must share a "
            "rank r >= 1. The file is damaged"
        )
