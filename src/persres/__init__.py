"""persres: Personalized Residuals (Ham et al., CVPR 2024) for Stable Diffusion.

Low-rank residuals on the ``proj_out`` of every transformer block of a frozen U-Net, trained from
a few photos of a concept, and sampled normally or with localized attention guidance.

Names are imported on first use, so ``persres --version`` and ``--help`` answer without loading
torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from persres import quiet as _quiet  # noqa: E402

_quiet.install()  # before transformers is imported anywhere: drop its torchvision false alarm

_EXPORTS = {
    "ResidualConfig": "persres.config",
    "TrainConfig": "persres.config",
    "ResidualProjOut": "persres.residuals",
    "add_residuals": "persres.residuals",
    "count_parameters": "persres.residuals",
    "find_residuals": "persres.residuals",
    "fold_residuals": "persres.residuals",
    "merge_residuals": "persres.residuals",
    "remove_residuals": "persres.residuals",
    "residuals_disabled": "persres.residuals",
    "unmerge_residuals": "persres.residuals",
    "load_residuals": "persres.io",
    "read_residual_file": "persres.io",
    "save_residuals": "persres.io",
    "train": "persres.train",
    "SampleSettings": "persres.sampling",
    "sample": "persres.sampling",
    "Concept": "persres.concepts",
    "load_concepts": "persres.concepts",
    "load_pipeline": "persres.pipeline",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from persres.concepts import Concept, load_concepts
    from persres.config import ResidualConfig, TrainConfig
    from persres.io import load_residuals, read_residual_file, save_residuals
    from persres.pipeline import load_pipeline
    from persres.residuals import (
        ResidualProjOut,
        add_residuals,
        count_parameters,
        find_residuals,
        fold_residuals,
        merge_residuals,
        remove_residuals,
        residuals_disabled,
        unmerge_residuals,
    )
    from persres.sampling import SampleSettings, sample
    from persres.train import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'persres' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
