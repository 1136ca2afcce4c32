"""What every toy base's training shares: batches fixed by (seed, stage, step), one resumable training
loop (checkpoints of weights, EMA and AdamW moments in safetensors), EMA, and the atomic export.

A stage's step ``k`` draws its scenes, captions and noise from generators seeded by (seed, stage, k)
only, and a checkpoint holds everything else the next step reads (weights, EMA shadow, AdamW moments),
so a run stopped after any checkpoint and resumed is the same run, weight for weight.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persres.files import atomic_dir, write_json
from persres.toyworld.scenes import caption, random_scene, render

log = logging.getLogger(__name__)


def scene_batch(seed: int, stage: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (B, 3, 32, 32) and dropped-word captions, fixed by (seed, stage, step)."""
    rng = np.random.default_rng([seed, stage, step])
    images, captions = [], []
    for _ in range(size):
        scene = random_scene(rng)
        image, _ = render(scene)
        images.append(image)
        captions.append(caption(scene, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def captioned_batch(
    seed: int, stage: int, step: int, size: int, dropout: float
) -> tuple[torch.Tensor, list[str], torch.Generator]:
    """``scene_batch`` with a ``dropout`` share of captions emptied (for classifier-free guidance), and
    the step's generator (seeded by seed and step) after that draw, for the step's noise."""
    pixels, captions = scene_batch(seed, stage, step, size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    drop = torch.rand(len(captions), generator=generator) < dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
    return pixels, captions, generator


class Ema:
    """Exponential moving average of parameters, warmed up so early steps are not frozen in."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, value in module.state_dict().items():
                if value.dtype.is_floating_point:
                    self.shadow[key].mul_(decay).add_(value, alpha=1 - decay)
                else:
                    self.shadow[key].copy_(value)


class _Holder(nn.Module):
    """A dict of tensors saved and loaded in place like a module's state (the EMA shadow)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        for key, value in state.items():
            self.tensors[key].copy_(value)


def save_state(
    folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int
) -> None:
    with atomic_dir(folder) as tmp:
        for name, module in modules.items():
            save_file(_unshared(module.state_dict()), tmp / f"{name}.safetensors")
        moments = {}
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                moments[f"{i}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
        save_file(moments, tmp / "optimizer.safetensors")
        write_json(tmp / "state.json", {"step": step})


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with tied tensors (T5's shared and encoder embeddings) copied apart: safetensors stores
    no two names for one memory; loading writes the same values to both."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.contiguous()
        out[key] = value.clone() if value.data_ptr() in seen else value
        seen.add(value.data_ptr())
    return out


def load_state(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    moments = load_file(folder / "optimizer.safetensors")
    state = optimizer.state_dict()
    for key, value in moments.items():
        index, field = key.split(".", 1)
        state["state"].setdefault(int(index), {})[field] = value.reshape(()) if field == "step" else value
    optimizer.load_state_dict(state)
    return int(json.loads((folder / "state.json").read_text())["step"])


def latest_checkpoint(work: Path, stage: str) -> Path | None:
    found = sorted(work.glob(f"{stage}-step-*"))
    return found[-1] if found else None


def _prune(work: Path, stage: str, keep: int = 2) -> None:
    for old in sorted(work.glob(f"{stage}-step-*"))[:-keep]:
        shutil.rmtree(old)


@dataclass(frozen=True)
class Stage:
    """One resumable training stage: its name (checkpoint folders ``{name}-step-NNNNNN`` in the work
    folder, and the log's), its steps and how often it checkpoints."""

    name: str
    steps: int
    checkpoint_every: int


StepLoss = Callable[[int], tuple[torch.Tensor, str]]  # step -> (loss, what the log adds after it)


def run_stage(
    stage: Stage,
    work: Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    step_loss: StepLoss,
    ema: Ema | None = None,
    clip: float | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> None:
    """Train ``modules`` (their parameters are ``optimizer``'s) from the stage's latest checkpoint in
    ``work`` to ``stage.steps``: each step sets the learning rate ``lr_at(step)``, takes ``step_loss(step)``,
    clips the gradient norm to ``clip``, steps AdamW and updates ``ema``. Every ``checkpoint_every`` steps
    and at the end the state is saved (the two latest kept) and ``on_checkpoint(step)`` called."""
    saved = dict(modules) | ({"ema": _Holder(ema.shadow)} if ema is not None else {})
    start = 0
    if (latest := latest_checkpoint(work, stage.name)) is not None:
        start = load_state(latest, saved, optimizer)
        log.info("resumed the %s stage at step %d from %s", stage.name, start, latest)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    began = time.monotonic()
    for step in range(start, stage.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, detail = step_loss(step)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(_only(modules), step)
        if (step + 1) % 25 == 0:
            rate = (step + 1 - start) / (time.monotonic() - began)
            log.info(
                "%s step %d/%d loss %.5f %s(%.2f steps/s)",
                *(stage.name, step + 1, stage.steps, loss.item(), detail, rate),
            )
        if (step + 1) % stage.checkpoint_every == 0 or step + 1 == stage.steps:
            save_state(work / f"{stage.name}-step-{step + 1:06d}", saved, optimizer, step + 1)
            _prune(work, stage.name)
            if on_checkpoint is not None:
                on_checkpoint(step + 1)


def _only(modules: dict[str, nn.Module]) -> nn.Module:
    if len(modules) != 1:
        raise ValueError("an EMA follows one module: put the trained parts in one nn.ModuleDict")
    return next(iter(modules.values()))


def write_pipeline(pipe: Any, out: Path, training: dict[str, Any]) -> None:
    """Save ``pipe`` (safetensors) with ``training.json`` as the folder ``out``, replacing it atomically."""
    fresh = out.with_name(out.name + ".new")
    if fresh.exists():
        shutil.rmtree(fresh)
    with atomic_dir(fresh) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", training)
    if out.exists():  # only a snapshot is replaced: the scripts refuse an existing --out up front
        shutil.rmtree(out)
    fresh.rename(out)
