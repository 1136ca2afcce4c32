"""``persres_concept.json``: what a peer method's result holds (token, class word, base, method, step,
the base's architecture), beside the files the method's own tools load (a diffusers pipeline folder,
attention processors); and the check every method's ``load`` makes of the architecture a result records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from persres.errors import ConfigError, InputError, quote
from persres.files import write_json
from persres.formats.concepts import Concept
from persres.formats.io import architecture_mismatch

CONCEPT_FILE = "persres_concept.json"
FORMAT = "persres-concept"


def write_concept(folder: Path, method: str, token: str, metadata: dict[str, str]) -> None:
    """``metadata`` is the run's (base_model, class_word, step, train_config, ...); ``token`` is the
    identifier the method's prompts use, which may differ from the run's --token (Custom Diffusion)."""
    if not metadata.get("class_word"):
        raise ConfigError(f"{method}: the run's metadata has no class_word; pass the run's metadata to save")
    write_json(folder / CONCEPT_FILE, {**metadata, "format": FORMAT, "method": method, "token": token})


def check_base(source: Path, metadata: Mapping[str, Any], unet: nn.Module) -> None:
    """Refuse a result made for another architecture than ``unet``'s (SD 1.x, SD 2.x, SDXL), as residual
    files are refused, before anything is loaded. A result of an earlier version records none."""
    recorded = metadata.get("architecture")
    if recorded is not None and not isinstance(recorded, str):
        raise InputError(f"{source}: its recorded architecture is not text; it was not written by persres")
    mismatch = architecture_mismatch(recorded, unet)
    if mismatch is not None:
        raise InputError(
            f"{source} {mismatch}. Use the base model it was trained on "
            f"({quote(str(metadata.get('base_model', 'unknown')))})"
        )


def read_concept(folder: Path, method: str, unet: nn.Module) -> Concept:
    """The concept of a result folder written by ``method`` for a base like ``unet``'s; refuses another
    method's folder and another architecture's."""
    path = Path(folder) / CONCEPT_FILE
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{path} is missing or not readable JSON ({exc}); pass the folder that persres train wrote"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f'{path} is not a persres concept file (no "format": "{FORMAT}")')
    if data.get("method") != method:
        other = data.get("method")
        raise InputError(f"{folder} holds a {quote(str(other))} result, not {method!r}; use `method` {other}")
    token, class_word = data.get("token"), data.get("class_word")
    if not isinstance(token, str) or not isinstance(class_word, str) or not token or not class_word:
        raise InputError(f"{path} records no token or class word; it was not made by persres train")
    check_base(Path(folder), data, unet)
    return Concept(token, class_word, str(folder))
