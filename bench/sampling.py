"""Time per denoising step: LAG sampling vs normal sampling, SD 1.5 U-Net architecture.

The U-Net is built from its published config with random weights and random non-zero residuals
(rank 0.05 m_i). One denoising step = one U-Net forward on a guided batch of 2 (unconditional +
conditional). Normal: default SDPA processors, residuals everywhere. LAG: explicit-softmax capture
processors on every attn2, per-block median masks at proj_out. Measured interleaved in one run,
median of --repeats.

    python bench/sampling.py [--device cpu|cuda] [--latent-size 32] [--repeats 5] [--fp16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from persres import add_residuals
from persres.core.lag import LagState, localized
from persres.testing.reference_configs import SD15_UNET


def build(device: str, dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
    for wrapper in add_residuals(unet).values():
        with torch.no_grad():
            wrapper.A.normal_(std=1e-3)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args()
    dtype = torch.float16 if args.fp16 else torch.float32
    unet = build(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, args.latent_size, args.latent_size, generator=g).to(args.device, dtype)
    text = torch.randn(2, 77, 768, generator=g).to(args.device, dtype)
    step = torch.tensor([500, 500], device=args.device)
    columns = torch.zeros(1, 1, 77)
    columns[0, 0, [5, 6]] = 1  # "a photo of a V* dog": identifier and class word
    state = LagState(columns)

    @torch.no_grad()
    def forward() -> None:
        unet(latents, step, encoder_hidden_states=text)

    def lag() -> None:
        with localized(unet, state):
            forward()

    def timed(fn: Callable[[], None]) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    runs = {"normal": forward, "lag": lag}
    for fn in runs.values():
        timed(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"SD 1.5 U-Net (random weights), {args.device}, {dtype}, "
        f"latents {args.latent_size}x{args.latent_size}, guided batch 2, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for name in runs:
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        print(f"{name:<7} {median[name]:.3f} s/step  (range {spread})")
    print(f"lag / normal = {median['lag'] / median['normal']:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
