"""Personalized residuals (Ham et al., CVPR 2024), the method of this project, behind the protocol.

Everything is delegated: ``persres.core.residuals`` adds and finds the residuals,
``persres.formats.io`` writes and reads the residual file (its format unchanged: checkpoints and results
alike), ``persres.formats.concepts`` loads a result for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from persres.backbones import denoiser_of
from persres.core.residuals import add_residuals, remove_residuals, residual_parameters
from persres.errors import ConfigError
from persres.formats.concepts import load_concepts
from persres.formats.io import load_residuals, save_residuals
from persres.formats.runfolder import RESIDUALS_FILE
from persres.methods.catalog import METHODS
from persres.methods.patches import patching
from persres.methods.protocol import Trainable

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from persres.config import TrainConfig
    from persres.formats.concepts import Concept


@dataclass(frozen=True)
class ResidualTrainable(Trainable):
    """The residual factors, and the denoiser they live in (the residual file records its architecture)."""

    denoiser: nn.Module | None = field(default=None, compare=False, repr=False)


class Residuals:
    name = "residuals"
    recipe = METHODS["residuals"].recipe
    options = METHODS["residuals"].options
    adds_token = False

    def training_prompt(self, config: TrainConfig) -> str:
        return config.prompt  # "a photo of a V* {class}", paper section 3

    def identifier(self, config: TrainConfig) -> str:
        return config.token

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            patches.requires_grad(pipe.vae, False)
            patches.requires_grad(pipe.text_encoder, False)
            denoiser = denoiser_of(pipe)
            add_residuals(denoiser, config.residual, generator=generator)  # freezes the denoiser
            patches.add(partial(remove_residuals, denoiser))  # the base's modules and flags back
            return ResidualTrainable(residual_parameters(denoiser), denoiser=denoiser)

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        pass

    def save_state(self, trainable: Trainable, path: Path, metadata: dict[str, str]) -> None:
        save_residuals(denoiser_in(trainable), path, overwrite=True, **metadata)

    def load_state(self, trainable: Trainable, path: Path) -> None:
        load_residuals(denoiser_in(trainable), path)

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        return save_residuals(denoiser_of(pipe), out / RESIDUALS_FILE, overwrite=True, **metadata)

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        with patching(pipe, self.name, "load") as patches:
            denoiser = denoiser_of(pipe)
            (concept,) = load_concepts(denoiser, [path])
            patches.add(partial(remove_residuals, denoiser))
            return concept


def denoiser_in(trainable: Trainable) -> nn.Module:
    if not isinstance(trainable, ResidualTrainable) or trainable.denoiser is None:
        raise ConfigError("the residuals method needs the Trainable its prepare() returned")
    return trainable.denoiser
