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
    "ResidualProjOut": "persres.core.residuals",
    "add_residuals": "persres.core.residuals",
    "count_parameters": "persres.core.residuals",
    "find_residuals": "persres.core.residuals",
    "fold_residuals": "persres.core.residuals",
    "merge_residuals": "persres.core.residuals",
    "remove_residuals": "persres.core.residuals",
    "residuals_disabled": "persres.core.residuals",
    "unmerge_residuals": "persres.core.residuals",
    "load_residuals": "persres.formats.io",
    "read_residual_file": "persres.formats.io",
    "save_residuals": "persres.formats.io",
    "train": "persres.training.train",
    "SampleSettings": "persres.inference.sampling",
    "sample": "persres.inference.sampling",
    "Concept": "persres.formats.concepts",
    "load_concepts": "persres.formats.concepts",
    "load_pipeline": "persres.core.pipeline",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from persres.config import ResidualConfig, TrainConfig
    from persres.core.pipeline import load_pipeline
    from persres.core.residuals import (
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
    from persres.formats.concepts import Concept, load_concepts
    from persres.formats.io import load_residuals, read_residual_file, save_residuals
    from persres.inference.sampling import SampleSettings, sample
    from persres.training.train import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'persres' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
