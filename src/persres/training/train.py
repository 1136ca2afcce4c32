"""Train personalized residuals: ``train(config, out) -> TrainResult``.

Paper recipe: frozen base, residuals on every ``proj_out``, plain denoising MSE on "a photo of a
V* {class}", no regularisation images, 150 steps, batch 4, lr 1e-3. Runs through ``accelerate``
(mixed precision, several GPUs with ``accelerate launch``). All randomness (batches, crops, noise,
timesteps) comes from one CPU generator per process whose state is checkpointed, so an interrupted
and resumed run ends where an uninterrupted one does. With `cache_latents` the photos' VAE posteriors
are encoded before the first step (``latent_cache.py``) and each step samples them. Each step's loss
goes to ``OUT/logs/loss.csv`` (``trainlog.py``); validation images to ``OUT/validation/step-NNNNNN/``
(``validation.py``). With `mask` the denoising loss is weighted inside and outside the concept's mask, from
the photos' files or the base's attention (``masks.py``, ``attention_masks.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from persres import __version__
from persres.backbones import Backbone, backbone_of
from persres.backbones.unet import SD
from persres.backbones.vae import Posterior
from persres.config import TrainConfig
from persres.core.conditioning import Condition, encode
from persres.core.pipeline import DTYPES, load_pipeline, prompt_readers, release_text_encoders, text_towers
from persres.core.tokens import check_identifier_read, check_token
from persres.errors import ConfigError, TrainingDivergedError, first_line
from persres.files import check_writable, write_json
from persres.formats.concepts import Concept, PromptPlan, check_prompt_length, plan_prompts
from persres.formats.io import architecture
from persres.formats.runfolder import CONFIG_FILE, LOGS, LOSS_CSV, LOSS_PNG, RunFolder, result_name
from persres.inference.sampling import PromptInputs
from persres.methods import check_runs_on, get_method
from persres.training.attention_masks import (
    AttentionMasks,
    TrainedAttentionMasks,
    class_columns,
    frozen_prediction,
)
from persres.training.batches import TrainingData, batch_conditioning
from persres.training.captions import read_captions
from persres.training.checkpoint import (
    Processes,
    TrainState,
    checkpoint_folder,
    list_checkpoints,
    save_checkpoint,
)
from persres.training.data import ConceptImages
from persres.training.latent_cache import LatentCache
from persres.training.masks import (
    ATTENTION,
    ATTENTION_TRAINED,
    LatentMask,
    anchored_mse,
    file_mask,
    from_files,
    loss_weights,
    read_masks,
    weighted_mse,
)
from persres.training.prior import class_prompt, prior_images
from persres.training.trainlog import LossLog, check_tracker, tracker_config
from persres.training.trainsetup import make_accelerator, make_state, processes_of, restore_or_start
from persres.training.validation import (
    drop_later,
    encode_validation,
    validation_due,
    validation_folder,
    write_final,
    write_validation,
)
from persres.words import real_words

log = logging.getLogger(__name__)

PROJECT = "persres"  # the trackers' run name (tensorboard: OUT/logs/persres/)

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainResult:
    out: Path
    residuals: Path
    steps: int
    final_loss: float | None
    parameters: int


@dataclass(frozen=True)
class Loop:
    """What the step loop works with, built once by ``prepare_loop``."""

    config: TrainConfig
    out: Path
    pipe: StableDiffusionPipeline
    denoiser: torch.nn.Module  # the forward pass's model (U-Net or transformer), wrapped when distributed
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of state.optimizer
    state: TrainState
    images: ConceptImages
    prior: ConceptImages | None  # class images, for the methods with prior preservation
    prior_text: Condition | None  # "a photo of a {class}"
    prompt: str  # the method's training prompt
    text: Condition  # its encoding, once unless the method trains the text side
    noise_scheduler: object  # the backbone's training schedule (DDPM for U-Nets, flow matching for Flux)
    accelerator: Accelerator
    log: LossLog | None  # the main process's
    folder: RunFolder  # names are recorded in its marker before they are created (persres.formats.runfolder)
    data: TrainingData | None = None  # with `captions` or `buckets`: each image's prompt, one size a batch
    texts: dict[str, Condition] | None = None  # with `captions` or `buckets`: each prompt's encoding
    latents: LatentCache | None = None  # with `cache_latents`: the photos' VAE posteriors
    prior_latents: LatentCache | None = None  # with `cache_latents` and prior images: theirs
    validation_inputs: dict[str, PromptInputs] | None = None  # `release_text_encoders`: encoded before
    attention: LatentMask | None = None  # `mask` attention(-trained): each step's mask from attention maps


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
    check_writable(out, "out")
    folder = RunFolder.check(Path(out), config.images, resume, overwrite, config.base)
    try:
        return train_in(folder, config, device, callback, progress, distributed)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        folder.release()
        if folder.created:  # a fresh run's folder holds only what this run wrote: leave nothing behind
            shutil.rmtree(folder.path, ignore_errors=True)
        raise ConfigError(
            f"training does not fit in memory at `batch_size` {config.batch_size} and `resolution` "
            f"{config.resolution} ({first_line(exc, 120)}); use a smaller `batch_size`, or "
            "`gradient_checkpointing`, or `mixed_precision` bf16"
        ) from None
    finally:
        folder.release()


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (GPU), Python's MemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "can't allocate memory" in text or "out of memory" in text or "failed to allocate" in text


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
    check_tracker(config.report_to)
    method = get_method(config.method)
    concept = [Concept(method.identifier(config), config.class_word)]
    validation = plan_prompts(list(config.validation_prompts), concept, allow_empty=True)
    # fail on bad images and captions before loading
    images = ConceptImages.from_folder(config.images, config.resolution, captions=config.captions)
    if from_files(config.mask):  # every mask checked with its photo before anything is loaded or written
        images = images.with_masks(read_masks(config.mask, images.paths))
    captions = read_captions(images.paths, concept[0].token, config.class_word) if config.captions else None
    accelerator = make_accelerator(config, device, out)
    processes = processes_of(accelerator) if distributed else Processes()
    pipe = load_pipeline(
        config.base, DTYPES[config.mixed_precision], accelerator.device, quantize=config.quantize_base
    )
    check_runs_on(config.method, backbone_of(pipe), config.base)
    check_timestep_weighting(config, backbone_of(pipe))
    for tokenizer, _ in text_towers(pipe):  # before prepare adds a token or trains over a row
        check_token(tokenizer, concept[0].token, new=method.adds_token)
    readers = prompt_readers(pipe)  # the text encoders whose tokens carry the prompt (Flux: T5)
    if not method.adds_token:  # an existing token (a learned one is added by prepare)
        check_identifier_read(readers, concept[0].token, real_words())
    # adds what the method trains and checks its settings against the model before anything is written
    trainable = method.prepare(pipe, config, torch.Generator().manual_seed(config.seed))
    for plan in validation:  # refused now, not after training when they are sampled
        for reader in readers:
            check_prompt_length(reader, plan, concept)
    if config.mask in (ATTENTION, ATTENTION_TRAINED):  # the class word found in the prompt, before writing
        class_columns(pipe, method.training_prompt(config), config.class_word)
    data = None
    if config.captions or config.buckets:  # off, the paper's recipe: one prompt, square crops
        check_captions(pipe, images, captions, concept)
        step = bucket_step(pipe) if config.buckets else None
        data = TrainingData.of(images, method.training_prompt(config), captions, step)
    prior = prior_images(config, processes, accelerator.device, progress)
    processes.barrier()  # every process has checked --out before the main one changes it
    if processes.is_main:
        folder.claim()  # lock; for --overwrite remove the earlier run's files; write the run marker
    state = make_state(config, pipe, method, trainable, processes)
    start = restore_or_start(out, resume, state)
    loop = prepare_loop(folder, pipe, state, images, prior, accelerator, start, distributed, data)
    try:
        loss = run_steps(loop, start, callback, progress)
        path = finish(loop)
    finally:
        close(loop)
    return TrainResult(out, path, config.steps, loss, trainable.count())


def check_timestep_weighting(config: TrainConfig, backbone: Backbone) -> None:
    """`timestep_weighting` is one the base's family offers (min-snr: the U-Net families)."""
    if config.timestep_weighting not in backbone.timestep_weightings:
        offered = ", ".join(backbone.timestep_weightings)
        raise ConfigError(
            f"`timestep_weighting` {config.timestep_weighting} is not offered on {backbone.name} "
            f"({config.base}): its training target is not DDPM's epsilon or v; use {offered}"
        )


def prepare_loop(
    folder: RunFolder,
    pipe: StableDiffusionPipeline,
    state: TrainState,
    images: ConceptImages,
    prior: ConceptImages | None,
    accelerator: Accelerator,
    start: int,
    distributed: bool,
    data: TrainingData | None = None,
) -> Loop:
    """Open the loss log (a damaged one fails here, before anything is written), write config.json,
    start the tracker and hand the model to accelerate. ``data``: with `captions` or `buckets`."""
    config, loss_log, out = state.config, None, folder.path
    if state.processes.is_main:
        folder.record(out / LOGS / LOSS_CSV)
        loss_log = LossLog.open(out, start)
        drop_later(out, start)
        folder.record(out / CONFIG_FILE)
        write_json(out / CONFIG_FILE, {"persres_version": __version__, **config.to_dict()})
    if config.report_to != "none":
        folder.record(out / LOGS / (PROJECT if config.report_to == "tensorboard" else config.report_to))
        kwargs = {"wandb": {"dir": str(out / LOGS)}}
        accelerator.init_trackers(PROJECT, config=tracker_config(config), init_kwargs=kwargs)
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    denoiser = accelerator.prepare(denoiser) if distributed else denoiser
    optimizer = accelerator.prepare(state.optimizer)
    prompt = state.method.training_prompt(config)
    text = encode(pipe, prompt, accelerator.device, config.resolution).detach()
    prior_text = None
    if prior is not None:
        prior_text = encode(
            pipe, class_prompt(config.class_word), accelerator.device, config.resolution
        ).detach()
    noise_scheduler = backbone.training_scheduler(pipe)
    texts = None
    if data is not None and not state.trainable.text_trainable:  # each distinct prompt encoded once
        device = accelerator.device
        texts = {p: encode(pipe, p, device, config.resolution).detach() for p in dict.fromkeys(data.prompts)}
    validation_inputs = None
    if config.release_text_encoders:  # every prompt the steps use is encoded above
        if config.validation_prompts and state.processes.is_main:  # the validation prompts, for the sampler
            validation_inputs = encode_validation(pipe, config)
        release(pipe, state)
    latents = prior_latents = None
    if config.cache_latents:
        latents = cache_latents(pipe, images, config.flip, accelerator, data)
        prior_latents = None if prior is None else cache_latents(pipe, prior, config.flip, accelerator)
    attention = None
    if config.mask in (ATTENTION, ATTENTION_TRAINED):  # the base's own pass, or the trained model's
        kind = AttentionMasks if config.mask == ATTENTION else TrainedAttentionMasks
        attention = kind.of(pipe, prompt, config.class_word)
    return Loop(
        config, out, pipe, denoiser, optimizer, state, images, prior, prior_text, prompt, text,
        noise_scheduler, accelerator, loss_log, folder, data, texts, latents, prior_latents,
        validation_inputs, attention,
    )  # fmt: skip


def cache_latents(
    pipe: StableDiffusionPipeline,
    images: ConceptImages,
    flip: bool,
    accelerator: Accelerator,
    data: TrainingData | None = None,
) -> LatentCache:
    """`cache_latents`: each photo's VAE posterior (and its mirror's with `flip`), encoded as a step would
    encode it (under the run's autocast), at its fixed crop (its bucket's with `buckets`). The VAE stays
    whole: its decoder draws the validation images and a saved pipeline holds its encoder."""
    backbone, device = backbone_of(pipe), accelerator.device

    def posterior(pixels: torch.Tensor) -> Posterior:
        return backbone.posterior(pipe, pixels, device)

    with accelerator.autocast():
        cache = LatentCache.encode(images, posterior, flip, None if data is None else data.buckets)
    log.info("latents cached: %d photos%s", len(cache.photos), " and their mirrors" if flip else "")
    return cache


def release(pipe: StableDiffusionPipeline, state: TrainState) -> None:
    """`release_text_encoders`: the text encoders dropped from the pipeline once the prompts are encoded."""
    if state.trainable.text_trainable:  # refused by the config already (the method's capability)
        raise ConfigError(f"`release_text_encoders` cannot be used with `method` {state.method.name}")
    released = release_text_encoders(pipe)
    log.info("text encoders released: %s parameters", f"{released:,}")


def bucket_step(pipe: StableDiffusionPipeline) -> int:
    """The multiple of the buckets' sides: 8 latent pixels (every denoiser persres trains takes latents
    whose sides are multiples of 8), 64 px for a VAE that downsamples by 8."""
    return 8 * int(pipe.vae_scale_factor)


def check_captions(
    pipe: StableDiffusionPipeline,
    images: ConceptImages,
    captions: list[str | None] | None,
    concept: list[Concept],
) -> None:
    """Refuse a caption whose identifier the text encoder would cut off (as a validation prompt is)."""
    if captions is None:
        return
    readers = prompt_readers(pipe)
    for path, caption in zip(images.paths, captions, strict=True):
        if caption is None:
            continue
        try:
            for reader in readers:
                check_prompt_length(reader, PromptPlan(caption, caption, (True,)), concept)
        except ConfigError as exc:
            raise ConfigError(f"caption of {path.name}: {exc}") from None


def run_steps(loop: Loop, start: int, callback: StepCallback | None, progress: bool) -> float | None:
    """Steps ``start + 1 .. config.steps``: train, log, validate, checkpoint; the last step's loss."""
    config, loss = loop.config, None
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc="training",
        disable=not (progress and loop.state.processes.is_main),
    )
    for step in bar:
        done = step + 1
        loss_tensor = train_step(loop, done)
        loss = loss_tensor.item()
        smoothed = record(loop, done, loss_tensor)
        if smoothed is not None:
            bar.set_postfix(smoothed_loss=f"{smoothed:.4f}")
        if validation_due(config, done) and loop.state.processes.is_main:
            loop.folder.record(validation_folder(loop.out, done))
            write_validation(loop.pipe, config, loop.out, done, loop.validation_inputs)
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoint(loop, done)
        if callback is not None:
            callback(done, loss)
    return loss


def train_step(loop: Loop, done: int) -> torch.Tensor:
    """One optimizer step; the loss, detached. Stops the run when the loss or the factors diverge."""
    config, state = loop.config, loop.state
    drawn = None
    if loop.data is None:
        pixels, masks = concept_batch(loop.images, loop.latents, config, state.generator)
    else:
        drawn = loop.data.draw(config.batch_size, state.generator, config.min_crop, config.flip, loop.latents)
        pixels, masks = drawn.pixels, drawn.masks
    mask = loop.attention if masks is None else file_mask(masks)
    with loop.accelerator.autocast():
        text = loop.text
        backbone = backbone_of(loop.pipe)
        if drawn is not None:  # each image's own prompt (`captions`), the batch's size (`buckets`)
            text = batch_conditioning(drawn, lambda prompt: prompt_text(loop, prompt), backbone)
        elif state.trainable.text_trainable:  # a learned token: the embedding changes every step
            text = encode(loop.pipe, loop.prompt, loop.accelerator.device, config.resolution)
        loss = denoising_loss(
            loop.denoiser, loop.pipe, loop.noise_scheduler, text, pixels, state.generator, backbone,
            mask, config.mask_background_weight, config.timestep_weighting, config.mask_background_target,
        )  # fmt: skip
        if loop.prior is not None and loop.prior_text is not None:  # DreamBooth's prior loss, unmasked
            classes, _ = concept_batch(loop.prior, loop.prior_latents, config, state.generator)
            prior = denoising_loss(
                loop.denoiser, loop.pipe, loop.noise_scheduler, loop.prior_text, classes, state.generator,
                backbone, timestep_weighting=config.timestep_weighting,
            )  # fmt: skip
            loss = loss + config.prior_weight * prior
    value = loss.item()
    if not math.isfinite(value):
        raise diverged(loop.out, done, value)
    loop.accelerator.backward(loss)
    for group in loop.optimizer.param_groups:
        group["lr"] = config.lr_at(done)  # `lr_schedule`
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    state.method.after_step(loop.pipe, state.trainable)
    if not torch.stack([torch.isfinite(p).all() for p in state.trainable.params.values()]).all():  # one sync
        raise diverged(loop.out, done, value, what=f"the {state.method.name} parameters")
    return loss.detach()


def concept_batch(
    images: ConceptImages, cache: LatentCache | None, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor | Posterior, torch.Tensor | None]:
    """A batch of ``images`` (B, 3, R, R), or with `cache_latents` their cached posteriors, chosen alike;
    with a `mask` from files, their masks (B, 1, R, R) cropped with them."""
    if cache is None:
        pixels, masks, _ = images.draw_masked(config.batch_size, generator, config.min_crop, config.flip)
        return pixels, masks
    posterior, masks, _ = cache.draw_masked(config.batch_size, generator)
    return posterior, masks


def prompt_text(loop: Loop, prompt: str) -> Condition:
    """A training prompt's conditioning: encoded once, or every step when the method trains the text side."""
    if loop.state.trainable.text_trainable or loop.texts is None:
        return encode(loop.pipe, prompt, loop.accelerator.device, loop.config.resolution)
    return loop.texts[prompt]


def record(loop: Loop, done: int, loss: torch.Tensor) -> float | None:
    """The step's row in loss.csv and the tracker; the smoothed loss (on the main process)."""
    mean = loop.state.processes.mean(loss).item()  # every process takes part
    lr = float(loop.state.optimizer.param_groups[0]["lr"])
    if loop.log is None:
        return None
    row = loop.log.append(done, mean, lr)
    loop.accelerator.log({"loss": mean, "smoothed_loss": row.smoothed_loss, "lr": lr}, step=done)
    return row.smoothed_loss


def checkpoint(loop: Loop, done: int) -> None:
    loop.folder.record(checkpoint_folder(loop.out, done), loop.out / LOGS / LOSS_PNG)
    if loop.log is not None:
        loop.log.sync()  # the rows up to this checkpoint are on disk before it
    save_checkpoint(loop.out, done, loop.state, run_metadata(loop.config, done))
    if loop.log is not None:
        loop.log.plot()


def finish(loop: Loop) -> Path:
    """The final residual file, validation images and loss plot."""
    path = loop.out  # what the other processes of a run report; the main one, the method's result
    if loop.state.processes.is_main:
        loop.folder.record(loop.out / result_name(loop.config.method), loop.out / LOGS / LOSS_PNG)
        if loop.config.validation_prompts:
            loop.folder.record(validation_folder(loop.out, loop.config.steps))
        # every result records its base architecture, which every method's load checks
        denoiser = backbone_of(loop.pipe).denoiser(loop.pipe)
        metadata = {**run_metadata(loop.config), "architecture": architecture(denoiser)}
        path = loop.state.method.save(loop.pipe, loop.state.trainable, loop.out, metadata)
        log.info("%s written to %s", loop.state.method.name, path)
        write_final(loop.pipe, loop.config, loop.out, loop.validation_inputs)
        if loop.log is not None:
            loop.log.plot()
    loop.state.processes.barrier()
    return path


def close(loop: Loop) -> None:
    if loop.log is not None:
        loop.log.close()
    # not accelerator.end_training(): it also destroys the process group, which the benchmark runner
    # (several runs in one process) and the caller's barriers still need
    for tracker in loop.accelerator.trackers:
        tracker.finish()


def denoising_loss(
    denoiser: torch.nn.Module,
    pipe: StableDiffusionPipeline,
    noise_scheduler: object,
    text: Condition,
    pixels: torch.Tensor | Posterior,
    generator: torch.Generator,
    backbone: Backbone = SD,
    mask: LatentMask | None = None,
    background: float = 0.0,
    timestep_weighting: str = "none",
    background_target: str = "photo",
) -> torch.Tensor:
    """Latent diffusion's MSE between the denoiser's prediction and its target, for a batch of ``pixels``
    (B, 3, H, W) or of their VAE posteriors (`cache_latents`). The backbone owns the VAE encoding, the
    latents sampled from it, the noise schedule, the target (epsilon or v for the U-Net family, the
    flow-matching velocity for Flux) and the denoiser call; the loop passes its pipeline's. With ``mask``
    (`mask`: the step's (B, 1, h, w) mask on the latent grid, whose prediction every backbone returns as
    (B, C, h, w)) the MSE is weighted, ``background`` outside the mask (``masks.py``); with
    ``timestep_weighting`` (not none) each image's share is weighted by the backbone's weight of its
    timestep; with ``background_target`` base the background is compared with the frozen base's own
    prediction (``masks.anchored_mse``)."""
    device = text.hidden.device
    posterior = pixels if isinstance(pixels, Posterior) else backbone.posterior(pipe, pixels, device)
    latents = backbone.latents(pipe, posterior, generator)
    noisy, steps, target = backbone.noised(noise_scheduler, latents, generator)
    per_image = backbone.timestep_weights(noise_scheduler, steps, timestep_weighting)
    if mask is None:
        prediction = backbone.predict(pipe, denoiser, noisy, steps, text)
        if per_image is None:
            return F.mse_loss(prediction.float(), target.float())
        return weighted_mse(prediction, target, torch.ones_like(noisy[:, :1]), per_image)
    with mask.watching(noisy):  # `mask` attention-trained reads this very pass
        prediction = backbone.predict(pipe, denoiser, noisy, steps, text)
    weights = mask(noisy, steps, text)
    if background_target == "base":
        base = mask.base_prediction()  # `mask` attention's own pass of the base, else one more
        if base is None:
            base = frozen_prediction(pipe, denoiser, backbone, noisy, steps, text)
        return anchored_mse(prediction, target, base, weights, background, per_image)
    return weighted_mse(prediction, target, loss_weights(weights, background), per_image)


def diverged(out: Path, step: int, loss: float, what: str = "") -> TrainingDivergedError:
    checkpoints = list_checkpoints(out)
    kept = (
        f"the last good checkpoint is kept at {checkpoints[-1].folder} (step {checkpoints[-1].step})"
        if checkpoints
        else "no checkpoint had been written yet (use a smaller `checkpoint_every`)"
    )
    return TrainingDivergedError(
        f"{what + ' became non-finite' if what else f'loss became {loss}'} at step {step}; "
        f"training stopped and {kept}. "
        "Lower `lr`, or use `mixed_precision` bf16 or no instead of fp16"
    )


def run_metadata(config: TrainConfig, step: int | None = None) -> dict[str, str]:
    return {
        "base_model": config.base,
        "token": config.token,
        "class_word": config.class_word,
        "class_word_reason": config.class_reason or "given by the user",
        "method": config.method,
        "rank_config": json.dumps(dataclasses.asdict(config.residual)),
        "train_config": config.to_json(),
        "step": str(config.steps if step is None else step),
        "persres_version": __version__,
    }
