"""``persres merge``: fold residuals into the denoiser's weights and write a plain diffusers pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from persres.backbones import denoiser_of
from persres.core.pipeline import load_pipeline
from persres.core.residuals import fold_residuals
from persres.errors import OutputExistsError
from persres.files import atomic_dir, check_apart, check_writable
from persres.formats.io import load_residuals, read_residual_file
from persres.formats.runs import read_from


def merge_to_folder(base: str, residuals: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a full diffusers pipeline whose denoiser has the residuals folded into its weights.

    The result loads with plain ``StableDiffusionPipeline.from_pretrained``; prompts still use the
    identifier token (recorded in ``persres_merge.json``).
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"`out` {out} already exists; merge writes a new folder, choose another path")
    check_writable(out, "out")
    check_apart(out, "out", [("base", base), ("residuals", read_from(residuals))])
    read_residual_file(residuals)  # a bad file fails before the model is loaded
    pipe = load_pipeline(base, torch.float32, "cpu", as_shipped=True)
    denoiser = denoiser_of(pipe)
    metadata = load_residuals(denoiser, residuals)
    fold_residuals(denoiser)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        note = {
            "merged_from": str(residuals),
            "base": base,
            "token": metadata.get("token"),
            "class_word": metadata.get("class_word"),
        }
        (tmp / "persres_merge.json").write_text(json.dumps(note, indent=2) + "\n")
    return out
