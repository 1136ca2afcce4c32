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
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import nn

from persres.core.tokens import text_length
from persres.files import atomic_dir, write_json
from persres.toyworld.model import (
    assemble,
    deterministic_posterior,
    toy_text_encoder,
    toy_tokenizer,
    toy_unet,
    toy_vae,
    training_scheduler,
)
from persres.toyworld.scenes import caption, random_scene, render

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


def _save_state(
    folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int
) -> None:
    with atomic_dir(folder) as tmp:
        for name, module in modules.items():
            save_file(
                {k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors"
            )
        moments = {}
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                moments[f"{i}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
        save_file(moments, tmp / "optimizer.safetensors")
        write_json(tmp / "state.json", {"step": step})


def _load_state(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    moments = load_file(folder / "optimizer.safetensors")
    state = optimizer.state_dict()
    for key, value in moments.items():
        index, field = key.split(".", 1)
        state["state"].setdefault(int(index), {})[field] = value.reshape(()) if field == "step" else value
    optimizer.load_state_dict(state)
    return int(json.loads((folder / "state.json").read_text())["step"])


def _latest(work: Path, stage: str) -> Path | None:
    found = sorted(work.glob(f"{stage}-step-*"))
    return found[-1] if found else None


def _prune(work: Path, stage: str, keep: int = 2) -> None:
    for old in sorted(work.glob(f"{stage}-step-*"))[:-keep]:
        shutil.rmtree(old)


def train_vae(config: BaseTrainConfig, work: Path) -> AutoencoderKL:
    torch.manual_seed(config.seed)
    vae = toy_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = 0
    if (latest := _latest(work, "vae")) is not None:
        start = _load_state(latest, {"vae": vae}, optimizer)
    for step in range(start, config.vae_steps):
        lr = config.vae_lr * (0.5 * (1 + math.cos(math.pi * step / config.vae_steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, _ = scene_batch(config.seed, 1, step, config.vae_batch)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.mean).sample
        error = recon - pixels
        loss = error.pow(2).mean() + 0.1 * error.abs().mean() + 1e-7 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            psnr = 10 * math.log10(4 / error.pow(2).mean().item())
            log.info("vae step %d/%d loss %.5f psnr %.1f dB", step + 1, config.vae_steps, loss.item(), psnr)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            _save_state(work / f"vae-step-{step + 1:06d}", {"vae": vae}, optimizer, step + 1)
            _prune(work, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pixels, _ = scene_batch(config.seed, 9, 0, 256)
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    deterministic_posterior(vae)
    return vae


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
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        for key, value in state.items():
            self.tensors[key].copy_(value)


def train_unet(config: BaseTrainConfig, work: Path, vae: AutoencoderKL, out: Path) -> None:
    torch.manual_seed(config.seed)
    tokenizer = toy_tokenizer()
    text_encoder, unet = toy_text_encoder(tokenizer), toy_unet()
    joint = nn.ModuleDict({"unet": unet, "text": text_encoder})
    ema = Ema(joint, config.ema_decay)
    scheduler = training_scheduler()
    optimizer = torch.optim.AdamW(joint.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01)
    modules = {"model": joint, "ema": _Holder(ema.shadow)}
    start = 0
    if (latest := _latest(work, "unet")) is not None:
        start = _load_state(latest, modules, optimizer)
        log.info("resumed the U-Net stage at step %d from %s", start, latest)
    alphas = scheduler.alphas_cumprod
    began = time.monotonic()
    for step in range(start, config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        pixels, captions = scene_batch(config.seed, 2, step, config.batch)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=text_length(tokenizer, text_encoder.config),
            truncation=True,
            return_tensors="pt",
        ).input_ids
        prediction = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=config.min_snr) / snr  # min-SNR weighting, epsilon prediction
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        nn.utils.clip_grad_norm_(joint.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(joint, step)
        if (step + 1) % 25 == 0:
            rate = (step + 1 - start) / (time.monotonic() - began)
            log.info(
                "unet step %d/%d loss %.4f (%.2f steps/s)", step + 1, config.unet_steps, loss.item(), rate
            )
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
            _save_state(work / f"unet-step-{step + 1:06d}", modules, optimizer, step + 1)
            _prune(work, "unet")
            export(ema.shadow, vae, work / "snapshot", step + 1, config)
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
    fresh = out.with_name(out.name + ".new")
    if fresh.exists():
        shutil.rmtree(fresh)
    with atomic_dir(fresh) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "training.json", {"unet_step": step, "config": asdict(config)})
    if out.exists():  # only the snapshot is replaced: main() refuses an existing --out up front
        shutil.rmtree(out)
    fresh.rename(out)


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
