"""Setting up a training run: the accelerator, the training state (optimizer, generator), and the
step it starts from: 0, or the latest checkpoint's when resuming.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from diffusers import StableDiffusionPipeline

from persres.backbones import denoiser_of
from persres.config import TrainConfig
from persres.core.pipeline import resolve_device
from persres.errors import ConfigError
from persres.formats.runfolder import CONFIG_FILE, LOGS
from persres.formats.runs import read_config
from persres.methods.protocol import Method, Trainable
from persres.training.checkpoint import Processes, TrainState, list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)


def make_accelerator(config: TrainConfig, device: str, out: Path) -> Accelerator:
    target = resolve_device(device)
    # accelerate keeps one process-wide state and refuses a second run with another precision;
    # forget the per-run part (not the distributed setup) so the library can train twice in a process.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    tracking: dict[str, Any] = {}
    if config.report_to != "none":
        project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS))
        tracking = {"log_with": config.report_to, "project_config": project}
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=target.type == "cpu", **tracking)
    except ValueError as exc:
        raise ConfigError(f"`mixed_precision` {config.mixed_precision} on {target}: {exc}") from None


def processes_of(accelerator: Accelerator) -> Processes:
    def mean(value: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(value, reduction="mean")

    return Processes(
        accelerator.process_index, accelerator.is_main_process, accelerator.wait_for_everyone, mean
    )


def make_state(
    config: TrainConfig,
    pipe: StableDiffusionPipeline,
    method: Method,
    trainable: Trainable,
    processes: Processes,
) -> TrainState:
    """AdamW over the method's trainable parameters and this process's generator, before any restore."""
    if config.gradient_checkpointing:
        denoiser_of(pipe).enable_gradient_checkpointing()
    params = list(trainable.params.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.adam_weight_decay)
    generator = torch.Generator().manual_seed(config.seed + processes.index)
    return TrainState(pipe, method, trainable, optimizer, generator, config, processes)


def restore_or_start(out: Path, resume: bool, state: TrainState) -> int:
    """The step to start from: 0, or the latest checkpoint's when resuming (restoring its state)."""
    config = state.config
    checkpoints = list_checkpoints(out) if resume else []
    if not checkpoints:
        if resume:
            check_same_settings(out / CONFIG_FILE, config)
            log.warning("`resume`: no checkpoint in %s, starting from step 0", out)
        return 0
    latest = checkpoints[-1]
    step = load_checkpoint(latest, state)
    if step > config.steps:
        raise ConfigError(f"{latest.folder} is at step {step}, past `steps` {config.steps}; raise `steps`")
    log.info("resuming from %s (step %d of %d)", latest.folder, step, config.steps)
    return step


def check_same_settings(config_file: Path, config: TrainConfig) -> None:
    """Resuming a run that left no checkpoint restarts it: only with the settings it was started with."""
    if not config_file.is_file():
        return
    why = (
        "it records the settings of a run that left no checkpoint: delete it to start afresh, or `overwrite`"
    )
    previous = read_config(config_file, why)
    changed = config.resumable_with(previous)
    if changed:
        raise ConfigError(
            f"`resume`: {config_file.parent} has no checkpoint and was started with other settings "
            f"{changed}; resume with the same settings, or start again with `overwrite`"
        )
