"""What a personalization method is, for the one training loop, sampler and benchmark of persres.

Following PEFT's tuners and k-diffusion's samplers: each method is one small module that says what it
trains, its authors' default recipe (in ``persres.methods.catalog``, readable without torch, with the
source of each number), how it saves (in the format the field's own tools load) and how it loads for
sampling. The loop, data, checkpoints, the loss log, sampling and scoring exist once
(``persres.training.train``, ``persres.inference.sampling``, ``persres.evaluation.benchmark``).

A method's life in a run:
1. ``prepare(pipe, config, generator)``: freeze the base, add what it trains (adapters, a token), and
   return a ``Trainable``: the parameters the optimizer updates, keyed by stable names (checkpoints
   store them under these names), and whether the text encoder's output depends on them.
2. every step: the loop computes the denoising loss on ``training_prompt(config)`` (re-encoded with
   gradients when ``Trainable.text_trainable``), plus, when the recipe asks for prior preservation,
   ``prior_weight`` times the loss on the class images; after the optimizer step, ``after_step``.
3. ``save_state`` / ``load_state``: the trainable tensors in a checkpoint (safetensors, strict).
   ``identifier(config)``: the concept's token in prompts (validation images, sampling).
4. ``save(pipe, trainable, out, metadata)``: the run's result (``out/residuals.safetensors`` for
   residuals; for the peers, diffusers' own formats in the folder ``out/result/``), loadable without
   persres where the format allows; persres' own metadata (token, class word, base, method) with it.
5. ``load(pipe, path)`` into a fresh base pipeline for sampling; returns the concept it holds.

Patches (STYLE.md, rule 4): ``prepare`` and ``load`` change the pipeline only through
``persres.methods.patches.patching``, which records each change with its exact inverse (hook handles
kept, processors restored from a complete copy of the originals, wrappers and adapters removed,
``requires_grad`` flags and dtypes put back) and marks the pipeline. A second ``prepare`` or ``load``
on a marked pipeline is refused, naming the method that patched it; ``patches.unpatch(pipe)`` undoes
every change, so the pipeline computes exactly what its base did. Where an inverse is not cheap it is
named instead of done: a learned token stays in the tokenizer (with its row; prompts without it encode
as before), and DreamBooth's ``load``, which copies a U-Net's weights in, makes ``unpatch`` refuse and
ask for a fresh base. Learned tokens are added, started and put in the prompt by ``new_token``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from persres.formats.runfolder import RESULT  # noqa: F401  (re-exported: where a peer method saves its result)
from persres.methods.catalog import Recipe

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from persres.config import TrainConfig
    from persres.formats.concepts import Concept


@dataclass(frozen=True)
class Trainable:
    """What the optimizer updates. ``params`` are keyed by stable names (module paths, or the token's
    name), the keys of every checkpoint. ``text_trainable``: the prompt's embedding depends on the
    parameters (a learned token), so the loop re-encodes it every step with gradients."""

    params: dict[str, nn.Parameter]
    text_trainable: bool = False

    def count(self) -> int:
        return sum(p.numel() for p in self.params.values())


class Method(Protocol):
    name: str  # as typed after --method
    recipe: Recipe  # persres.methods.catalog's, as are the options below and the method's capabilities
    options: frozenset[str]  # method-specific settings that apply (e.g. {"rank", "init"}); others refused
    adds_token: bool  # its identifier is a new token it adds (else an existing one, e.g. "sks")

    def training_prompt(self, config: TrainConfig) -> str:
        """The caption of every training image, e.g. "a photo of a sks dog"."""
        ...

    def identifier(self, config: TrainConfig) -> str:
        """The concept's token as prompts contain it ("V*" is replaced by it), e.g. "sks" or "<new1>"."""
        ...

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable: ...

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        """After each optimizer step (e.g. keep every embedding row but the new token's fixed)."""
        ...

    def save_state(self, trainable: Trainable, path: Path, metadata: dict[str, str]) -> None:
        """The trainable tensors for a checkpoint (safetensors). ``trainable`` is the very object
        ``prepare`` returned (a method may keep there what it needs, e.g. the U-Net)."""
        ...

    def load_state(self, trainable: Trainable, path: Path) -> None:
        """Restore what ``save_state`` wrote, strictly (a missing, extra or mis-shaped tensor is named)."""
        ...

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        """Write the run's result into the run folder ``out``; returns the file or folder to load."""
        ...

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        """Load a result written by ``save`` into a fresh base pipeline; the concept it holds."""
        ...
