"""Train the toy world's base model from scratch, reproducibly, resumably, on a CPU.

    python -m persres.toyworld.train_base --work toyworld-work --out models/toyworld-base

Stage 1 trains the VAE on reconstruction (near-lossless: 8 latent channels), stage 2 the U-Net and
text encoder together on fresh scenes (epsilon prediction, min-SNR-5 weighting, 10% empty captions
for classifier-free guidance, EMA weights exported). Every batch is drawn from a generator seeded by
(seed, stage, step), so a run stopped and resumed from a checkpoint is the same run. Checkpoints
(weights, EMA, AdamW moments; safetensors) land in ``--work`` every ``checkpoint_every`` steps; the
exported pipeline is written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from persres.core.tokens import text_length
from persres.files import write_json
from persres.toyworld.model import (
    assemble,
    deterministic_posterior,
    toy_text_encoder,
    toy_tokenizer,
    toy_unet,
    toy_vae,
    training_scheduler,
)
from persres.toyworld.training import Ema, Stage, captioned_batch, run_stage, scene_batch, write_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseTrainConfig:
    seed: int = 0
    vae_steps: int = 1600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 4500
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    min_snr: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    threads: int = 2


def train_vae(config: BaseTrainConfig, work: Path) -> AutoencoderKL:
    torch.manual_seed(config.seed)
    vae = toy_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)

    def step_loss(step: int) -> tuple[torch.Tensor, str]:
        pixels, _ = scene_batch(config.seed, 1, step, config.vae_batch)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.mean).sample
        error = recon - pixels
        loss = error.pow(2).mean() + 0.1 * error.abs().mean() + 1e-7 * posterior.kl().mean()
        return loss, f"psnr {10 * math.log10(4 / error.pow(2).mean().item()):.1f} dB "

    run_stage(
        Stage("vae", config.vae_steps, config.checkpoint_every),
        work,
        {"vae": vae},
        optimizer,
        lambda step: config.vae_lr * (0.5 * (1 + math.cos(math.pi * step / config.vae_steps))),
        step_loss,
    )
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pixels, _ = scene_batch(config.seed, 9, 0, 256)
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    deterministic_posterior(vae)
    return vae


def train_unet(config: BaseTrainConfig, work: Path, vae: AutoencoderKL, out: Path) -> None:
    torch.manual_seed(config.seed)
    tokenizer = toy_tokenizer()
    text_encoder, unet = toy_text_encoder(tokenizer), toy_unet()
    joint = nn.ModuleDict({"unet": unet, "text": text_encoder})
    ema = Ema(joint, config.ema_decay)
    scheduler = training_scheduler()
    optimizer = torch.optim.AdamW(joint.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01)
    alphas = scheduler.alphas_cumprod
    length = text_length(tokenizer, text_encoder.config)

    def step_loss(step: int) -> tuple[torch.Tensor, str]:
        pixels, captions, generator = captioned_batch(
            config.seed, 2, step, config.batch, config.caption_dropout
        )
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(
            captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        prediction = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=config.min_snr) / snr  # min-SNR weighting, epsilon prediction
        return (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean(), ""

    run_stage(
        Stage("unet", config.unet_steps, config.checkpoint_every),
        work,
        {"model": joint},
        optimizer,
        lambda step: config.lr * min(1.0, (step + 1) / config.warmup),
        step_loss,
        ema=ema,
        clip=1.0,
        on_checkpoint=lambda step: export(ema.shadow, vae, work / "snapshot", step, config),
    )
    export(ema.shadow, vae, out, config.unet_steps, config)


def export(
    shadow: dict[str, torch.Tensor], vae: AutoencoderKL, out: Path, step: int, config: BaseTrainConfig
) -> None:
    """Write the EMA weights as a diffusers pipeline folder (replacing ``out`` atomically)."""
    tokenizer = toy_tokenizer()
    text_encoder, unet = toy_text_encoder(tokenizer), toy_unet()
    joint = nn.ModuleDict({"unet": unet, "text": text_encoder})
    joint.load_state_dict(shadow)
    pipe = assemble(unet.eval(), vae, text_encoder.eval(), tokenizer)
    write_pipeline(pipe, out, {"unet_step": step, "config": asdict(config)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's base model from scratch.")
    parser.add_argument("--work", type=Path, default=Path("toyworld-work"), help="checkpoints (resumable)")
    parser.add_argument("--out", type=Path, default=Path("models/toyworld-base"))
    parser.add_argument("--unet-steps", type=int, default=BaseTrainConfig.unet_steps)
    parser.add_argument("--vae-steps", type=int, default=BaseTrainConfig.vae_steps)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = BaseTrainConfig(unet_steps=args.unet_steps, vae_steps=args.vae_steps)
    torch.set_num_threads(config.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    write_json(args.work / "config.json", asdict(config))
    vae = train_vae(config, args.work)
    train_unet(config, args.work, vae, args.out)


if __name__ == "__main__":
    main()
