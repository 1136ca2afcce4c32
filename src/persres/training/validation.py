"""Validation images of a training run: ``OUT/validation/step-NNNNNN/``.

Every ``--validation-every`` steps, and once at the end, each ``--validation-prompt`` is sampled from the
same seed (the run's), so the folders show the same images as training goes on. A folder holds one PNG
(+ JSON sidecar) per prompt and ``grid.png``, the prompts side by side. The last step's folder
(``step-{--steps}``) holds the final images. Each folder is written under a temporary name and renamed
when complete; on resume from step k the folders after k (the interrupted run's, redone) are removed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline

from persres.config import TrainConfig
from persres.files import atomic_dir
from persres.formats.concepts import Concept
from persres.formats.runfolder import GRID, VALIDATION
from persres.inference.outputs import save_png, side_by_side, write_samples
from persres.inference.sampling import PromptInputs, SampleSettings, encode_prompts, sample

log = logging.getLogger(__name__)

VALIDATION_STEPS = 25  # DDIM steps: enough to see the concept, cheap enough to repeat during training


def validation_folder(out: Path, step: int) -> Path:
    return out / VALIDATION / f"step-{step:06d}"


def validation_due(config: TrainConfig, step: int) -> bool:
    """Periodic validation (``--validation-every``); the final images are written by ``write_final``."""
    every = config.validation_every
    return bool(config.validation_prompts) and every is not None and step % every == 0


def concepts_of(config: TrainConfig) -> list[Concept]:
    return [Concept(config.token, config.class_word)]


def encode_validation(pipe: StableDiffusionPipeline, config: TrainConfig) -> dict[str, PromptInputs]:
    """The validation prompts as the pipeline's embeddings, made before `release_text_encoders` frees
    the text encoders: the images are then the same as with the encoders loaded."""
    return encode_prompts(pipe, list(config.validation_prompts), concepts_of(config))


def write_validation(
    pipe: StableDiffusionPipeline,
    config: TrainConfig,
    out: Path,
    step: int,
    encoded: dict[str, PromptInputs] | None = None,
) -> Path:
    """One image per validation prompt (V* = the identifier), at the training resolution, plus a grid.
    ``encoded``: the prompts' embeddings (``encode_validation``) when the text encoders are released."""
    settings = SampleSettings(
        steps=VALIDATION_STEPS, seed=config.seed, height=config.resolution, width=config.resolution
    )
    prompts = list(config.validation_prompts)
    samples = sample(pipe, prompts, concepts_of(config), settings, progress=False, encoded=encoded)
    target = validation_folder(out, step)
    extra = {"base": config.base, "token": config.token, "train_step": step}
    with atomic_dir(target) as tmp:
        write_samples(tmp, samples, settings, extra)
        save_png(side_by_side([item.image for item in samples]), tmp / GRID)
    log.info("validation images written to %s", target)
    return target


def write_final(
    pipe: StableDiffusionPipeline,
    config: TrainConfig,
    out: Path,
    encoded: dict[str, PromptInputs] | None = None,
) -> Path | None:
    """The final images, unless ``--validation-every`` already wrote them at the last step."""
    if not config.validation_prompts:
        return None
    target = validation_folder(out, config.steps)
    return target if target.is_dir() else write_validation(pipe, config, out, config.steps, encoded)


def drop_later(out: Path, step: int) -> None:
    """On resume from ``step``: remove the folders the interrupted run wrote after it."""
    root = out / VALIDATION
    if not root.is_dir():
        return
    for folder in root.glob("step-*"):
        number = folder.name.removeprefix("step-")
        if number.isdecimal() and int(number) > step and folder.is_dir():
            shutil.rmtree(folder)
