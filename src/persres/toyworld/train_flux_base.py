"""Train the toy world's Flux-shaped base model from scratch, reproducibly, resumably, on a CPU.

    python -m persres.toyworld.train_flux_base --work toyworld-flux-work --out models/toyworld-flux

The VAE is the U-Net world's trained one (``--vae``, models/toyworld-base by default), reused as it is:
its 8 latent channels packed 2x2 are the transformer's 32 input channels (``persres.toyworld.model_flux``).
One stage trains the transformer and both text encoders (CLIP, pooled; T5, sequence) together on fresh
scenes, as persres' Flux backbone trains (``persres.backbones.flux``): flow matching, sigma at a uniform
index into the scheduler's training table, velocity target, the transformer called as diffusers' Flux
pipeline calls it, the prompt encoded by the pipeline's own ``encode_prompt`` (T5 padded to
``text_length``, 32 tokens, which the saved T5 tokenizer states as its ``model_max_length``: Flux has no
text mask and reads the padding, so sampling must pad to the same length). 10% empty
captions (for true classifier-free guidance), captions with words dropped as the U-Net base's, gradient
clipping 1.0, EMA weights exported. The same scenes and captions, batch for batch, as the U-Net base's
stage 2 (stage 2 of seed 0). Every batch is drawn from (seed, stage, step), so a run stopped and resumed
from a checkpoint is the same run (``persres.toyworld.training``).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch import nn

from persres.backbones.flux import FLUX, FluxConditioning
from persres.files import write_json
from persres.toyworld.model_flux import (
    SCHEDULER,
    ToyFlux,
    as_flux_vae,
    latent_statistics,
    toy_flux_pipeline,
)
from persres.toyworld.training import Ema, Stage, captioned_batch, run_stage, scene_batch, write_pipeline

log = logging.getLogger(__name__)

STAGE = 2  # the U-Net base's stage 2 draws the same scenes and captions


@dataclass(frozen=True)
class FluxTrainConfig:
    seed: int = 0
    steps: int = 5000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    text_length: int = 32  # T5 tokens per prompt (see model_flux: not the pipeline's default 512)
    heads: int = 6  # of 32: width 192
    double_blocks: int = 2
    single_blocks: int = 4
    checkpoint_every: int = 250
    threads: int = 2


def flux_vae(base: Path, seed: int) -> AutoencoderKL:
    """The U-Net world's VAE from ``base`` with its latents' shift and scale measured on 256 scenes."""
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
    vae.eval().requires_grad_(False)
    pixels, _ = scene_batch(seed, 9, 0, 256)
    return as_flux_vae(vae, *latent_statistics(vae, pixels))


def _pipeline(config: FluxTrainConfig, vae: AutoencoderKL) -> ToyFlux:
    return toy_flux_pipeline(
        vae, config.text_length, config.heads, config.double_blocks, config.single_blocks
    )


def _trained(pipe: ToyFlux) -> nn.ModuleDict:
    return nn.ModuleDict(
        {"transformer": pipe.transformer, "text": pipe.text_encoder, "text_2": pipe.text_encoder_2}
    )


def train_flux(config: FluxTrainConfig, work: Path, vae: AutoencoderKL, out: Path) -> None:
    torch.manual_seed(config.seed)
    pipe = _pipeline(config, vae)
    pipe.set_progress_bar_config(disable=True)
    joint = _trained(pipe)
    ema = Ema(joint, config.ema_decay)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    optimizer = torch.optim.AdamW(joint.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def step_loss(step: int) -> tuple[torch.Tensor, str]:
        pixels, captions, generator = captioned_batch(
            config.seed, STAGE, step, config.batch, config.caption_dropout
        )
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.mean - shift) * scale
        noisy, steps, target = FLUX.noised(scheduler, latents, generator)
        hidden, pooled, text_ids = pipe.encode_prompt(
            captions, prompt_2=None, device=torch.device("cpu"), max_sequence_length=config.text_length
        )
        condition = FluxConditioning(hidden, pooled, text_ids)
        prediction = FLUX.predict(pipe, pipe.transformer, noisy, steps, condition)
        return (prediction - target).pow(2).mean(), ""

    run_stage(
        Stage("flux", config.steps, config.checkpoint_every),
        work,
        {"model": joint},
        optimizer,
        lambda step: config.lr * min(1.0, (step + 1) / config.warmup),
        step_loss,
        ema=ema,
        clip=1.0,
        on_checkpoint=lambda step: export_flux(ema.shadow, vae, work / "snapshot", step, config),
    )
    export_flux(ema.shadow, vae, out, config.steps, config)


def export_flux(
    shadow: dict[str, torch.Tensor], vae: AutoencoderKL, out: Path, step: int, config: FluxTrainConfig
) -> None:
    """Write the EMA weights as a Flux pipeline folder (replacing ``out`` atomically)."""
    pipe = _pipeline(config, vae)
    _trained(pipe).load_state_dict(shadow)
    write_pipeline(pipe, out, {"step": step, "config": asdict(config)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's Flux-shaped base model from scratch.")
    parser.add_argument(
        "--work", type=Path, default=Path("toyworld-flux-work"), help="checkpoints (resumable)"
    )
    parser.add_argument("--out", type=Path, default=Path("models/toyworld-flux"))
    parser.add_argument(
        "--vae", type=Path, default=Path("models/toyworld-base"), help="the toy base whose VAE is reused"
    )
    parser.add_argument("--steps", type=int, default=FluxTrainConfig.steps)
    parser.add_argument(
        "--threads",
        type=int,
        default=FluxTrainConfig.threads,
        help="torch threads (1 beside another torch process: two 2-thread processes on 2 cores crawl); "
        "recorded in training.json, since the thread count may change the last bits of a sum",
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    if not (args.vae / "vae").is_dir():
        parser.error(f"{args.vae} has no vae folder; pass the toy base's folder (models/toyworld-base)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = FluxTrainConfig(steps=args.steps, threads=args.threads)
    torch.set_num_threads(config.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    write_json(args.work / "config.json", asdict(config))
    train_flux(config, args.work, flux_vae(args.vae, config.seed), args.out)


if __name__ == "__main__":
    main()
