"""DreamBooth (Ruiz et al., CVPR 2023): the whole U-Net fine-tuned on "a photo of a sks dog", with a
prior-preservation loss (weight 1) on images the base model draws for "a photo of a dog".

As diffusers' ``examples/dreambooth/train_dreambooth.py`` by default, the text encoder stays frozen
(``--train_text_encoder`` is off). The result is a complete diffusers pipeline folder (safetensors):
the trained U-Net with the base's other components, scheduler and safety checker as the base ships
them, so plain ``StableDiffusionPipeline.from_pretrained(folder)`` samples it; ``persres_concept.json``
beside them names the token and class word.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from persres.errors import InputError, ModelError, first_line
from persres.files import atomic_dir
from persres.formats.concepts import Concept
from persres.methods.catalog import METHODS
from persres.methods.concept_json import CONCEPT_FILE, read_concept, write_concept
from persres.methods.named_tensors import NamedTensorState
from persres.methods.patches import Patches, patching
from persres.methods.protocol import RESULT, Trainable

if TYPE_CHECKING:
    from persres.config import TrainConfig



class DreamBooth(NamedTensorState):
    name = "dreambooth"
    recipe = METHODS["dreambooth"].recipe
    options = METHODS["dreambooth"].options
    adds_token = False

    def training_prompt(self, config: TrainConfig) -> str:
        return f"a photo of a {config.token} {config.class_word}"

    def identifier(self, config: TrainConfig) -> str:
        return config.token

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            for model in (pipe.vae, pipe.text_encoder):
                patches.requires_grad(model, False)
            patches.requires_grad(pipe.unet, True)
            return Trainable(dict(pipe.unet.named_parameters()))

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        return None

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        target = Path(out) / RESULT
        shipped = as_shipped(pipe)
        with atomic_dir(target, replace=True) as tmp:  # an extended run rewrites its result
            shipped.save_pretrained(tmp, safe_serialization=True)
            write_concept(tmp, self.name, metadata.get("token", ""), metadata)
        return target

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        """Copy the U-Net of a saved pipeline folder into ``pipe`` (its base), strictly. Keeping the base's
        U-Net to undo it would double the memory: the pipeline is marked irreversible instead."""
        with patching(pipe, self.name, "load") as patches:
            return load_unet(pipe, Path(path), patches)


def load_unet(pipe: StableDiffusionPipeline, path: Path, patches: Patches) -> Concept:
    """``DreamBooth.load``, the pipeline marked irreversible in ``patches`` before its U-Net changes."""
    concept = read_concept(path, DreamBooth.name, pipe.unet)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}/unet is missing or damaged ({first_line(exc)}); pass the folder train wrote"
        ) from None
    theirs, ours = unet.state_dict(), pipe.unet.state_dict()
    for key in sorted(set(theirs) & set(ours)):  # torch would list every differing tensor, in 87 lines
        if theirs[key].shape != ours[key].shape:
            raise InputError(
                f"{path}/unet does not fit this base model's U-Net: {key} is {tuple(theirs[key].shape)} "
                f"in the result, {tuple(ours[key].shape)} in the base; use the base it was trained on "
                f"(its {CONCEPT_FILE} names it)"
            )
    patches.irreversible = "it copied a DreamBooth U-Net's weights over the base's"
    try:
        result = pipe.unet.load_state_dict(theirs, strict=False)
    except RuntimeError as exc:
        raise InputError(f"{path}/unet does not fit this base's U-Net ({first_line(exc)})") from None
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{path}/unet does not fit this base model's U-Net: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; use the base it was trained on"
        )
    return concept


def as_shipped(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The trained components with the base's own scheduler, safety checker and feature extractor, as
    train_dreambooth.py saves (``DiffusionPipeline.from_pretrained(base, unet=...)``): persres loads
    the base with DDIM and without the safety checker, which a shared pipeline should not lose."""
    base = pipe.name_or_path
    if not base:
        return pipe
    try:
        return StableDiffusionPipeline.from_pretrained(
            base,
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the base model {base} to save the DreamBooth pipeline: {exc}"
        ) from None


DREAMBOOTH = DreamBooth()
