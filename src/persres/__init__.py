"""persres: Personalized Residuals (Ham et al., CVPR 2024) for Stable Diffusion.

Low-rank residuals on the ``proj_out`` of every transformer block of a frozen U-Net, trained from
a few photos of a concept, and sampled normally or with localized attention guidance.
"""

__version__ = "0.1.0"

from persres.config import ResidualConfig, TrainConfig  # noqa: E402
from persres.io import load_residuals, read_residual_file, save_residuals  # noqa: E402
from persres.residuals import (  # noqa: E402
    ResidualProjOut,
    add_residuals,
    count_parameters,
    find_residuals,
    fold_residuals,
    merge_residuals,
    remove_residuals,
    residuals_disabled,
    set_residuals_enabled,
    unmerge_residuals,
)

__all__ = [
    "__version__",
    "ResidualConfig",
    "ResidualProjOut",
    "TrainConfig",
    "add_residuals",
    "count_parameters",
    "find_residuals",
    "fold_residuals",
    "load_residuals",
    "merge_residuals",
    "read_residual_file",
    "remove_residuals",
    "residuals_disabled",
    "save_residuals",
    "set_residuals_enabled",
    "unmerge_residuals",
]
