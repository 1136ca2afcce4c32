"""``persres info``: what a residual file holds, read from its header without importing torch.

Standard library only (through ``persres.formats.header``), so the command answers at once; the file is
checked by the same rules ``read_residual_file`` applies (tensor values, e.g. NaN, are not read).
"""

from __future__ import annotations

import json
import os
from typing import Any

from persres.backbones.records import describe as describe_architecture
from persres.formats.header import read_residual_header
from persres.formats.runfolder import residual_file


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance, the base's architecture (e.g. "SD 1.x (proj_out conv, text width 768)"; None in files
    that record none), per-layer widths and ranks, and the parameter count of a residual file."""
    header = read_residual_header(residual_file(path))
    metadata = header.metadata
    layers = [
        {"path": name, "m": a.shape[0], "rank": a.shape[1], "parameters": a.numel + b.numel}
        for name, (a, b) in header.layers().items()
    ]
    return {
        "file": str(header.path),
        "format_version": int(metadata["format_version"]),
        "base_model": metadata.get("base_model"),
        "architecture": describe_architecture(metadata["architecture"])
        if "architecture" in metadata
        else None,
        "token": metadata.get("token"),
        "class_word": metadata.get("class_word"),
        "rank_config": json.loads(metadata["rank_config"]) if "rank_config" in metadata else None,
        "steps": int(metadata["step"]) if "step" in metadata else None,
        "persres_version": metadata.get("persres_version"),
        "layers": layers,
        "total_parameters": sum(layer["parameters"] for layer in layers),
    }
