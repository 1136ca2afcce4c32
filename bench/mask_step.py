"""The cost of masked training per step: `mask` attention and a mask from files vs `mask` none, on the SD 1.5
U-Net architecture (its published config, random weights; nothing is downloaded).

Measured side by side in one run, interleaved, median of --repeats after a warm-up each; every step is
forward + backward + AdamW step of personalized residuals (rank 0.05 m_i) on one U-Net:

- none:      the plain MSE (the paper's recipe)
- file:      the MSE weighted by a pixel mask area-averaged to the latent grid (`mask` alpha or a folder)
- attention: the same weighted MSE, the mask made first by the frozen base (residuals bypassed) under
             no_grad with LAG's capture processors on every attn2, the class word's maps summed on the latent
             grid and binarised at the median (``training.attention_masks.AttentionMasks``, as training
             runs it)
- attention-trained: the same weighted MSE, the maps captured during the training forward itself (the
             model being trained, not the frozen base; detached): no second pass
             (``training.attention_masks.TrainedAttentionMasks``)
- file+base: a file mask, the background held to the frozen base's prediction (`mask_background_target`
             base, weight 1: ``masks.anchored_mse``), which takes one more no_grad pass of the base
- attention+base: the same with `mask` attention, whose own pass of the base gives that prediction

    OMP_NUM_THREADS=1 python bench/mask_step.py [--latent-size 16] [--batch-size 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from persres import add_residuals
from persres.backbones.unet import SD, Conditioning
from persres.config import ResidualConfig
from persres.testing.reference_configs import SD15_UNET
from persres.training.attention_masks import AttentionMasks, TrainedAttentionMasks, frozen_prediction
from persres.training.masks import anchored_mse, loss_weights, to_latent_grid, weighted_mse

KINDS = ("none", "file", "attention", "attention-trained", "file+base", "attention+base")
CLASS_COLUMN = 5  # "a photo of a sks dog": <start> a photo of a sks dog -> "dog" at position 5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (default 16: 128 px)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    size, batch = args.latent_size, args.batch_size
    print(
        f"SD 1.5 U-Net (random weights), cpu, fp32, latents {size}x{size} ({size * 8} px), batch {batch}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats"
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.requires_grad_(False)
    params = [p for w in add_residuals(unet, ResidualConfig()).values() for p in (w.A, w.B)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch, 4, size, size, generator=g)
    steps = torch.randint(1000, (batch,), generator=g)
    text = Conditioning(torch.randn(batch, 77, SD15_UNET["cross_attention_dim"], generator=g))
    target = torch.randn(noisy.shape, generator=g)
    pixels = torch.zeros(batch, 1, size * 8, size * 8)
    pixels[..., size * 2 : size * 6, size * 2 : size * 6] = 1.0  # a centred square subject
    columns = torch.zeros(1, 1, 77)
    columns[..., CLASS_COLUMN] = 1.0
    pipe = argparse.Namespace(unet=unet)  # what SD.predict reads of a pipeline
    attention = AttentionMasks(pipe, unet, SD, columns)
    trained = TrainedAttentionMasks(pipe, unet, SD, columns)
    masks: dict[str, Callable[[], torch.Tensor | None]] = {
        "none": lambda: None,
        "file": lambda: to_latent_grid(pixels, (size, size)),
        "attention": lambda: attention(noisy, steps, text),
        "attention-trained": lambda: None,
        "file+base": lambda: to_latent_grid(pixels, (size, size)),
        "attention+base": lambda: attention(noisy, steps, text),
    }

    def step(kind: str) -> float:
        start = time.perf_counter()
        inside = masks[kind]()
        if kind == "attention-trained":
            with trained.watching(noisy):
                prediction = SD.predict(pipe, unet, noisy, steps, text)
            inside = trained(noisy, steps, text)
        else:
            prediction = SD.predict(pipe, unet, noisy, steps, text)
        if kind.endswith("+base"):
            base = attention.base_prediction() if kind == "attention+base" else None
            if base is None:
                base = frozen_prediction(pipe, unet, SD, noisy, steps, text)
            loss = anchored_mse(prediction, target, base, inside, 1.0)
        elif inside is None:
            loss = F.mse_loss(prediction.float(), target.float())
        else:
            loss = weighted_mse(prediction, target, loss_weights(inside, 0.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    mask_only = time.perf_counter()
    made = attention(noisy, steps, text)
    mask_only = time.perf_counter() - mask_only
    print(f"attention mask alone: {mask_only:.3f} s ({made.mean().item():.2f} of the latents inside)")
    for kind in KINDS:
        step(kind)  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            times[kind].append(step(kind))
    median = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"{'mask':<19}{'median s/step':>15}{'single steps':>20}")
    for kind in KINDS:
        print(f"{kind:<19}{median[kind]:>15.3f}{min(times[kind]):>12.3f}-{max(times[kind]):.3f}")
    print(f"file / none      = {median['file'] / median['none']:.3f}")
    print(f"attention / none = {median['attention'] / median['none']:.3f}  (target <= 1.10)")
    print(f"attention-trained / none = {median['attention-trained'] / median['none']:.3f}  (target <= 1.10)")
    print(f"file+base / none = {median['file+base'] / median['none']:.3f}")
    print(f"attention+base / none = {median['attention+base'] / median['none']:.3f}")


if __name__ == "__main__":
    main()
