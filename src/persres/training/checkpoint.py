"""Training checkpoints: the method's trainable tensors, AdamW moments and random-generator state, all
in safetensors.

A checkpoint folder ``checkpoints/step-000050/`` holds ``residuals.safetensors`` (other methods:
``{method}.safetensors``),
``optimizer.safetensors`` (AdamW moments keyed by factor name), ``rng-{process}.safetensors`` (the
data/noise generator of each process) and ``state.json`` (step, config). It is written under a
temporary name and renamed when complete, so a run killed while saving leaves the previous one;
old checkpoints are renamed away before they are deleted, so no half-deleted one is left either.
Restoring all three makes a resumed run continue exactly where the interrupted one stood.

Every file is read back strictly: a damaged or hand-edited one is an ``InputError`` that names it
and says what to do (delete that checkpoint to resume from the one before, or ``--overwrite``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from persres import readback
from persres.config import TrainConfig
from persres.errors import ConfigError, InputError, PersresError
from persres.files import write_json
from persres.formats.runfolder import (
    CHECKPOINTS,
    STATE_FILE,
    Checkpoint,
    damaged_checkpoint,
    list_checkpoints,
)
from persres.methods.protocol import Method, Trainable

log = logging.getLogger(__name__)

KEEP_LAST = 2
OPTIMIZER = "optimizer.safetensors"


@dataclass(frozen=True)
class Processes:
    """Who this process is in a run: alone by default, or one of ``accelerate launch``'s processes."""

    index: int = 0
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    mean: Callable[[torch.Tensor], torch.Tensor] = lambda value: value  # over the processes


@dataclass(frozen=True)
class TrainState:
    """What a checkpoint saves and restores: the method's trainable tensors (inside ``pipe``), AdamW's
    moments and this process's data/noise generator. ``names`` keys each parameter as the method does
    (residuals: by module path)."""

    pipe: StableDiffusionPipeline
    method: Method
    trainable: Trainable
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    config: TrainConfig
    processes: Processes = field(default_factory=Processes)

    @property
    def names(self) -> dict[nn.Parameter, str]:
        return {param: name for name, param in self.trainable.params.items()}

    @property
    def tensors_file(self) -> str:
        """The trainable tensors' file in a checkpoint: ``residuals.safetensors`` for residuals (a
        residual file, usable as one), ``{method}.safetensors`` for the others."""
        return f"{self.method.name}.safetensors"


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """AdamW per-parameter state keyed ``{factor name}.{exp_avg|exp_avg_sq|step}``."""
    tensors: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"{names[param]}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    names: dict[nn.Parameter, str],
    tensors: dict[str, torch.Tensor],
    file: Path,
) -> None:
    """Strictly: every factor has its moments, shaped like the factor, and nothing else is there."""
    by_name = {name: param for param, name in names.items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, moment = key.rpartition(".")
        if name not in by_name:
            raise damaged_checkpoint(file, f"tensor {key!r} belongs to no trained parameter of this model")
        states.setdefault(name, {})[moment] = value
    missing = sorted(set(by_name) - set(states))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise damaged_checkpoint(file, f"no AdamW state for {missing[0]}{more}")
    moments = {"step", "exp_avg", "exp_avg_sq"} | (
        {"max_exp_avg_sq"} if optimizer.defaults.get("amsgrad") else set()
    )
    for name, state in states.items():
        param = by_name[name]
        if set(state) != moments:
            raise damaged_checkpoint(
                file, f"{name} has AdamW state {sorted(state)}, expected {sorted(moments)}"
            )
        for moment, value in state.items():
            expected = () if moment == "step" else tuple(param.shape)
            if tuple(value.shape) != expected or not value.is_floating_point():
                raise damaged_checkpoint(
                    file, f"{name}.{moment} is {value.dtype} {tuple(value.shape)}, expected float {expected}"
                )
    for name, state in states.items():
        param = by_name[name]
        restored = {k: v.to(param.device) for k, v in state.items()}
        if "step" in restored:
            restored["step"] = restored["step"].to("cpu", torch.float32)
        optimizer.state[param] = restored


def save_checkpoint(out: Path, step: int, state: TrainState, metadata: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint folder for ``step``; keeps the newest KEEP_LAST."""
    processes = state.processes
    final = checkpoint_folder(out, step)
    staging = final.with_name(f".{final.name}.tmp")
    if processes.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    processes.barrier()
    save_file({"state": state.generator.get_state()}, str(staging / f"rng-{processes.index}.safetensors"))
    if processes.is_main:
        tags: dict[str, str] = {**(metadata or {}), "step": str(step)}
        state.method.save_state(state.trainable, staging / state.tensors_file, tags)
        save_file(optimizer_tensors(state.optimizer, state.names), str(staging / OPTIMIZER))
        write_json(staging / STATE_FILE, {"step": step, "config": state.config.to_dict()})
    processes.barrier()
    if processes.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(out)[:-KEEP_LAST]:
            remove_folder(old.folder)
        log.info("checkpoint saved: %s", final)
    processes.barrier()
    return final


def remove_folder(folder: Path) -> None:
    """Rename first: a kill while deleting leaves a hidden leftover, never a half checkpoint."""
    doomed = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# why `steps` may not change on resume with a decaying learning rate (``TrainConfig.resumable_with``)
COSINE_STEPS = " (`lr_schedule` cosine decays over the run's `steps`: such a run cannot be extended)"


def load_checkpoint(checkpoint: Checkpoint, state: TrainState) -> int:
    """Restore the trainable tensors, optimizer and generator; returns the step the checkpoint was made at."""
    folder = checkpoint.folder
    saved = read_state(folder / STATE_FILE, checkpoint.step)
    changed = state.config.resumable_with(saved)
    if changed:
        raise ConfigError(
            f"cannot resume from {folder}: settings differ from the interrupted run: {changed}"
            f"{COSINE_STEPS if 'steps' in changed else ''}; resume with the same settings, or start a new "
            "run with `overwrite`"
        )
    rng_file = folder / f"rng-{state.processes.index}.safetensors"
    if not rng_file.is_file():
        raise InputError(
            f"{folder} has no random state for process {state.processes.index}; resume with the same "
            "number of processes as the interrupted run"
        )
    try:
        state.method.load_state(state.trainable, folder / state.tensors_file)
    except PersresError as exc:
        raise damaged_checkpoint(folder / state.tensors_file, str(exc)) from None
    restore_optimizer(state.optimizer, state.names, read_tensors(folder / OPTIMIZER), folder / OPTIMIZER)
    restore_generator(state.generator, read_tensors(rng_file), rng_file)
    return checkpoint.step


def read_state(file: Path, step: int) -> TrainConfig:
    """``state.json``: the step (that of the folder's name) and the config the run was made with."""
    try:
        data: Any = readback.load_file(file)
    except (OSError, ValueError) as exc:
        raise damaged_checkpoint(file, str(exc)) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise damaged_checkpoint(file, 'expected an object with "step" and "config"')
    if type(data.get("step")) is not int or data["step"] != step:
        raise damaged_checkpoint(file, f"its step {data.get('step')!r} is not the folder's step {step}")
    try:
        return TrainConfig.from_dict(data["config"])
    except ConfigError as exc:
        raise damaged_checkpoint(file, f"its config is not valid: {exc}") from None


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise damaged_checkpoint(file, "missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise damaged_checkpoint(file, f"not a safetensors file: {exc}") from None


def restore_generator(generator: torch.Generator, tensors: dict[str, torch.Tensor], file: Path) -> None:
    state = tensors.get("state")
    if state is None or set(tensors) != {"state"} or state.dtype != torch.uint8:
        raise damaged_checkpoint(file, "expected one uint8 tensor 'state'")
    try:
        generator.set_state(state)
    except RuntimeError as exc:
        raise damaged_checkpoint(file, f"not a generator state: {exc}") from None
