"""Training checkpoints: residuals, AdamW moments and random-generator state, all in safetensors.

A checkpoint folder ``checkpoints/step-000050/`` holds ``residuals.safetensors``,
``optimizer.safetensors`` (AdamW moments keyed by factor name), ``rng-{process}.safetensors`` (the
data/noise generator of each process) and ``state.json`` (step, config). It is written under a
temporary name and renamed when complete, so a run killed while saving leaves the previous one.
Restoring all three makes a resumed run continue exactly where the interrupted one stood.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persres.config import TrainConfig
from persres.errors import ConfigError, InputError
from persres.files import write_json
from persres.io import load_residuals, save_residuals

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
KEEP_LAST = 2


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Checkpoint]:
    """Complete checkpoints (with state.json) of a run, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.name.startswith("step-") and (folder / "state.json").is_file():
            found.append(Checkpoint(folder, int(folder.name.split("-")[1])))
    return sorted(found, key=lambda c: c.step)


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
    optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str], tensors: dict[str, torch.Tensor]
) -> None:
    for param, name in names.items():
        keys = [k for k in tensors if k.rsplit(".", 1)[0] == name]
        if not keys:
            continue
        optimizer.state[param] = {k.rsplit(".", 1)[1]: tensors[k].to(param.device) for k in keys}
        step = optimizer.state[param].get("step")
        if step is not None:
            optimizer.state[param]["step"] = step.to("cpu", torch.float32)


def save_checkpoint(
    out: Path,
    step: int,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: dict[nn.Parameter, str],
    generator: torch.Generator,
    config: TrainConfig,
    process_index: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint folder for ``step``; keeps the newest KEEP_LAST."""
    wait = barrier or (lambda: None)
    final = checkpoint_folder(out, step)
    staging = final.with_name(f".{final.name}.tmp")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    wait()
    save_file({"state": generator.get_state()}, str(staging / f"rng-{process_index}.safetensors"))
    if is_main:
        tags: dict[str, str] = {**(metadata or {}), "step": str(step)}
        save_residuals(unet, staging / "residuals.safetensors", overwrite=False, **tags)
        save_file(optimizer_tensors(optimizer, names), str(staging / "optimizer.safetensors"))
        write_json(staging / "state.json", {"step": step, "config": config.to_dict()})
    wait()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(out)[:-KEEP_LAST]:
            shutil.rmtree(old.folder, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    wait()
    return final


def load_checkpoint(
    checkpoint: Checkpoint,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: dict[nn.Parameter, str],
    generator: torch.Generator,
    config: TrainConfig,
    process_index: int = 0,
) -> int:
    """Restore residuals, optimizer and generator; returns the step the checkpoint was made at."""
    state = json.loads((checkpoint.folder / "state.json").read_text(encoding="utf-8"))
    saved = TrainConfig.from_dict(state["config"])
    changed = config.resumable_with(saved)
    if changed:
        raise ConfigError(
            f"cannot resume from {checkpoint.folder}: settings differ from the interrupted run: {changed}; "
            "resume with the same settings, or start a new run with --overwrite"
        )
    rng_file = checkpoint.folder / f"rng-{process_index}.safetensors"
    if not rng_file.is_file():
        raise InputError(
            f"{checkpoint.folder} has no random state for process {process_index}; resume with the same "
            "number of processes as the interrupted run"
        )
    load_residuals(unet, checkpoint.folder / "residuals.safetensors")
    restore_optimizer(optimizer, names, load_file(str(checkpoint.folder / "optimizer.safetensors")))
    generator.set_state(load_file(str(rng_file))["state"])
    return int(state["step"])
