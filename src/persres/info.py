"""``persres info``: what a residual file holds (placeholder until the torch-free header reader lands)."""

from __future__ import annotations

import os
from typing import Any

from persres.io import read_residual_file


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``persres info`` prints: provenance, per-layer widths and ranks, parameter count."""
    loaded = read_residual_file(path)
    layers = [
        {"path": name, "m": int(a.shape[0]), "rank": int(a.shape[1]), "parameters": a.numel() + b.numel()}
        for name, (a, b) in loaded.layers().items()
    ]
    return {
        "file": str(loaded.path),
        "format_version": int(loaded.metadata["format_version"]),
        "base_model": loaded.metadata.get("base_model"),
        "token": loaded.metadata.get("token"),
        "class_word": loaded.metadata.get("class_word"),
        "rank_config": loaded.json_field("rank_config"),
        "steps": int(loaded.metadata["step"]) if "step" in loaded.metadata else None,
        "persres_version": loaded.metadata.get("persres_version"),
        "layers": layers,
        "total_parameters": sum(layer["parameters"] for layer in layers),
    }
