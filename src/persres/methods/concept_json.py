"""``persres_concept.json``: what a peer method's result holds (token, class word, base, method, step),
beside the files the method's own tools load (a diffusers pipeline folder, attention processors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persres.concepts import Concept
from persres.errors import ConfigError, InputError
from persres.files import write_json

CONCEPT_FILE = "persres_concept.json"
FORMAT = "persres-concept"


def write_concept(folder: Path, method: str, token: str, metadata: dict[str, str]) -> None:
    """``metadata`` is the run's (base_model, class_word, step, train_config, ...); ``token`` is the
    identifier the method's prompts use, which may differ from the run's --token (Custom Diffusion)."""
    if not metadata.get("class_word"):
        raise ConfigError(f"{method}: the run's metadata has no class_word; pass the run's metadata to save")
    write_json(folder / CONCEPT_FILE, {**metadata, "format": FORMAT, "method": method, "token": token})


def read_concept(folder: Path, method: str) -> Concept:
    """The concept of a result folder written by ``method``; refuses another method's folder."""
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
        raise InputError(f"{folder} holds a {other!r} result, not {method!r}; use --method {other}")
    token, class_word = data.get("token"), data.get("class_word")
    if not isinstance(token, str) or not isinstance(class_word, str) or not token or not class_word:
        raise InputError(f"{path} records no token or class word; it was not made by persres train")
    return Concept(token, class_word, str(folder))
