"""Train personalized residuals: ``train(config, out) -> TrainResult``.

Paper recipe: frozen base, residuals on every ``proj_out``, plain denoising MSE on "a photo of a
V* {class}", no regularisation images, 150 steps, batch 4, lr 1e-3. Runs through ``accelerate``
(mixed precision, several GPUs with ``accelerate launch``). All randomness (batches, crops, noise,
timesteps) comes from one CPU generator per process whose state is checkpointed, so an interrupted
and resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from persres import __version__
from persres.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from persres.concepts import Concept, plan_prompts
from persres.config import TrainConfig
from persres.data import ConceptImages
from persres.errors import ConfigError, TrainingDivergedError
from persres.files import check_writable, write_json
from persres.io import save_residuals
from persres.macro import real_words
from persres.outputs import write_samples
from persres.pipeline import DTYPES, load_pipeline, resolve_device
from persres.residuals import add_residuals, count_parameters, residual_parameters
from persres.runfolder import CONFIG_FILE, RESIDUALS_FILE, RunFolder
from persres.sampling import SampleSettings, sample
from persres.tokens import check_identifier

log = logging.getLogger(__name__)

VALIDATION_STEPS = 25

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainResult:
    out: Path
    residuals: Path
    steps: int
    final_loss: float | None
    parameters: int


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    callback: StepCallback | None = None,
    progress: bool = True,
    distributed: bool = True,
) -> TrainResult:
    """Train residuals for the concept in ``config.images`` and write them to ``out``.

    ``callback(step, loss)`` runs after every optimizer step (raise in it to stop the run).
    Under ``accelerate launch`` the processes train one run together (gradients are averaged);
    ``distributed=False`` makes each process train its own run alone on its own device (the
    benchmark runner's case: one concept per process).
    """
    check_writable(out, "--out")
    folder = RunFolder.check(Path(out), config.images, resume, overwrite)  # see persres.runfolder
    try:
        return train_in(folder, config, device, callback, progress, distributed)
    finally:
        folder.release()


def train_in(
    folder: RunFolder,
    config: TrainConfig,
    device: str,
    callback: StepCallback | None,
    progress: bool,
    distributed: bool,
) -> TrainResult:
    """``train`` in a checked ``--out``, which the main process claims once the settings are checked."""
    out, resume = folder.path, folder.resume
    plan_prompts(
        list(config.validation_prompts), [Concept(config.token, config.class_word)], allow_empty=True
    )
    images = ConceptImages.from_folder(config.images, config.resolution)  # fail on bad images before loading
    accelerator = make_accelerator(config, device)
    processes = Processes.of(accelerator) if distributed else Processes()
    pipe = load_pipeline(config.base, DTYPES[config.mixed_precision], accelerator.device)
    check_identifier(pipe.tokenizer, config.token, real_words())
    residuals = add_residuals(  # checks the ranks against the model before anything is written
        pipe.unet, config.residual, generator=torch.Generator().manual_seed(config.seed)
    )
    processes.barrier()  # every process has checked --out before the main one changes it
    if processes.is_main:
        folder.claim()  # lock; for --overwrite remove the earlier run's files; write the run marker
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    named = residual_parameters(pipe.unet)
    names = {param: name for name, param in named.items()}
    optimizer = torch.optim.AdamW(list(named.values()), lr=config.lr, weight_decay=config.adam_weight_decay)
    generator = torch.Generator().manual_seed(config.seed + processes.index)
    start = restore_or_start(out, config, resume, pipe, optimizer, names, generator, processes.index)
    if processes.is_main:
        write_json(out / CONFIG_FILE, {"persres_version": __version__, **config.to_dict()})
    unet = accelerator.prepare(pipe.unet) if distributed else pipe.unet
    optimizer = accelerator.prepare(optimizer)
    text = pipe.encode_prompt(config.prompt, accelerator.device, 1, False)[0]  # (1, T, D)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loss = None
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc="training",
        disable=not (progress and processes.is_main),
    )
    for step in bar:
        pixels = images.batch(config.batch_size, generator, config.min_crop, config.flip)
        with accelerator.autocast():
            loss_tensor = denoising_loss(unet, pipe, noise_scheduler, text, pixels, generator)
        loss = loss_tensor.item()
        if not math.isfinite(loss):
            raise diverged(out, step + 1, loss)
        accelerator.backward(loss_tensor)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.stack([torch.isfinite(p).all() for p in named.values()]).all():  # one device sync
            raise diverged(out, step + 1, loss, what="the residual factors")
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(
                out,
                done,
                pipe.unet,
                optimizer,
                names,
                generator,
                config,
                processes.index,
                processes.is_main,
                processes.barrier,
                run_metadata(config, done),
            )
        if callback is not None:
            callback(done, loss)
    path = out / RESIDUALS_FILE
    if processes.is_main:
        save_residuals(pipe.unet, path, overwrite=True, **run_metadata(config))
        log.info("residuals written to %s", path)
        write_validation_images(pipe, config, out / "validation", progress)
    processes.barrier()
    return TrainResult(out, path, config.steps, loss, count_parameters(residuals))


@dataclass(frozen=True)
class Processes:
    """Who this process is in a run: alone by default, or one of ``accelerate launch``'s processes."""

    index: int = 0
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, accelerator: Accelerator) -> Processes:
        return cls(accelerator.process_index, accelerator.is_main_process, accelerator.wait_for_everyone)


def write_validation_images(
    pipe: StableDiffusionPipeline, config: TrainConfig, folder: Path, progress: bool
) -> None:
    """One image per validation prompt (V* = the identifier), at the training resolution."""
    if not config.validation_prompts:
        return
    settings = SampleSettings(
        steps=VALIDATION_STEPS, seed=config.seed, height=config.resolution, width=config.resolution
    )
    concept = Concept(config.token, config.class_word)
    samples = sample(pipe, list(config.validation_prompts), [concept], settings, progress=progress)
    write_samples(folder, samples, settings, {"base": config.base, "token": config.token})


def make_accelerator(config: TrainConfig, device: str) -> Accelerator:
    target = resolve_device(device)
    # accelerate keeps one process-wide state and refuses a second run with another precision;
    # forget the per-run part (not the distributed setup) so the library can train twice in a process.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=target.type == "cpu")
    except ValueError as exc:
        raise ConfigError(f"--mixed-precision {config.mixed_precision} on {target}: {exc}") from None


def denoising_loss(
    unet: torch.nn.Module,
    pipe: StableDiffusionPipeline,
    noise_scheduler: DDPMScheduler,
    text: torch.Tensor,
    pixels: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Latent diffusion's MSE between the U-Net's prediction and its target (epsilon or v)."""
    vae, device = pipe.vae, text.device
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
        latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor  # (N, 4, h, w)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    steps = torch.randint(
        noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    )
    steps = steps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, steps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, steps)
    else:
        target = noise
    condition = text.expand(latents.shape[0], -1, -1)
    prediction = unet(noisy, steps, encoder_hidden_states=condition).sample
    return F.mse_loss(prediction.float(), target.float())


def restore_or_start(
    out: Path,
    config: TrainConfig,
    resume: bool,
    pipe: StableDiffusionPipeline,
    optimizer: torch.optim.Optimizer,
    names: dict[torch.nn.Parameter, str],
    generator: torch.Generator,
    process_index: int,
) -> int:
    """The step to start from: 0, or the latest checkpoint's when resuming (restoring its state)."""
    checkpoints = list_checkpoints(out) if resume else []
    if not checkpoints:
        if resume:
            check_same_settings(out / CONFIG_FILE, config)
            log.warning("--resume: no checkpoint in %s, starting from step 0", out)
        return 0
    latest = checkpoints[-1]
    step = load_checkpoint(latest, pipe.unet, optimizer, names, generator, config, process_index)
    if step > config.steps:
        raise ConfigError(f"{latest.folder} is at step {step}, past --steps {config.steps}; raise --steps")
    log.info("resuming from %s (step %d of %d)", latest.folder, step, config.steps)
    return step


def check_same_settings(config_file: Path, config: TrainConfig) -> None:
    """Resuming a run that left no checkpoint restarts it: only with the settings it was started with."""
    if not config_file.is_file():
        return
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    saved.pop("persres_version", None)
    changed = config.resumable_with(TrainConfig.from_dict(saved))
    if changed:
        raise ConfigError(
            f"--resume: {config_file.parent} has no checkpoint and was started with other settings "
            f"{changed}; resume with the same settings, or start again with --overwrite"
        )


def diverged(out: Path, step: int, loss: float, what: str = "") -> TrainingDivergedError:
    checkpoints = list_checkpoints(out)
    kept = (
        f"the last good checkpoint is kept at {checkpoints[-1].folder} (step {checkpoints[-1].step})"
        if checkpoints
        else "no checkpoint had been written yet (use a smaller --checkpoint-every)"
    )
    return TrainingDivergedError(
        f"{what + ' became non-finite' if what else f'loss became {loss}'} at step {step}; "
        f"training stopped and {kept}. "
        "Lower --lr, or use --mixed-precision bf16 or no instead of fp16"
    )


def run_metadata(config: TrainConfig, step: int | None = None) -> dict[str, str]:
    return {
        "base_model": config.base,
        "token": config.token,
        "class_word": config.class_word,
        "class_word_reason": config.class_reason or "given by the user",
        "rank_config": json.dumps(dataclasses.asdict(config.residual)),
        "train_config": config.to_json(),
        "step": str(config.steps if step is None else step),
        "persres_version": __version__,
    }
