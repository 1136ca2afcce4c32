"""Personalized residuals (Ham et al., CVPR 2024) through the method protocol: a low-rank residual on
every transformer block's ``proj_out``; the residual file format of ``persres.io``, unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from persres.concepts import Concept, load_concepts
from persres.config import METHOD_OPTIONS, TrainConfig
from persres.io import load_residuals, save_residuals
from persres.methods.protocol import Recipe, Trainable
from persres.residuals import add_residuals, residual_parameters

RESIDUALS_FILE = "residuals.safetensors"


class Residuals:
    name = "residuals"
    recipe = Recipe(
        steps=150,
        lr=1e-3,
        batch_size=4,
        source="Ham et al., CVPR 2024, section 4: 150 iterations, batch 4, lr 1e-3",
    )
    options = METHOD_OPTIONS["residuals"]

    def training_prompt(self, config: TrainConfig) -> str:
        return f"a photo of a {config.token} {config.class_word}"  # paper, section 3

    def identifier(self, config: TrainConfig) -> str:
        return config.token

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        add_residuals(pipe.unet, config.residual, generator=generator)  # freezes the rest
        return Trainable(dict(residual_parameters(pipe.unet)))

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        return None

    def save_state(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, path: Path, metadata: dict[str, str]
    ) -> None:
        save_residuals(pipe.unet, path, overwrite=False, **metadata)  # a checkpoint is a residual file too

    def load_state(self, pipe: StableDiffusionPipeline, trainable: Trainable, path: Path) -> None:
        load_residuals(pipe.unet, path)

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        return save_residuals(pipe.unet, out / RESIDUALS_FILE, overwrite=True, **metadata)

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        return load_concepts(pipe.unet, [path])[0]


RESIDUALS = Residuals()
