"""Cost of LAG's capture on Flux: one block with ``FluxCaptureProcessor`` vs diffusers' ``FluxAttnProcessor``.

A double-stream and a single-stream block of Flux's kind (random weights), at Flux's head size (128)
and T5 length (512) but fewer heads (the width) and a smaller image than Flux.1 at 1024 px (24 heads,
4096 image tokens), so that it runs on a CPU. The capture hands 2 text columns (V* and the class
word) to a hook that keeps them. Timed interleaved in one run, median of --repeats; the ratio is what
LAG adds to a block's forward (the residuals' own cost is the same in both samplers).

    python bench/flux_lag_capture.py [--heads 4] [--text 512] [--side 32] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from persres.backbones.flux_attention import FluxCaptureProcessor

HEAD_DIM = 128  # Flux.1's
AXES = (16, 56, 56)  # Flux.1's rotary axes, summing to HEAD_DIM


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--side", type=int, default=32, help="image tokens per side (packed latents)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    width, image = args.heads * HEAD_DIM, args.side * args.side
    double = FluxTransformerBlock(width, args.heads, HEAD_DIM).to(args.device, dtype).eval()
    single = FluxSingleTransformerBlock(width, args.heads, HEAD_DIM).to(args.device, dtype).eval()
    rows, cols = torch.meshgrid(torch.arange(args.side), torch.arange(args.side), indexing="ij")
    ids = torch.cat(
        [torch.zeros(args.text, 3), torch.stack([torch.zeros(image), rows.flatten(), cols.flatten()], -1)]
    )
    rotary = FluxPosEmbed(10000, list(AXES))(ids.to(args.device))
    hidden = torch.randn(1, image, width, device=args.device, dtype=dtype)
    text = torch.randn(1, args.text, width, device=args.device, dtype=dtype)
    temb = torch.randn(1, width, device=args.device, dtype=dtype)
    kept: list[torch.Tensor] = []
    keys = torch.tensor([5, 6])  # V* and the class word
    capture = FluxCaptureProcessor(lambda probs, keys=None: kept.append(probs), keys, args.text)
    stock = FluxAttnProcessor()
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, block in (("double", double), ("single", single)):
                for kind, processor in (("stock", stock), ("capture", capture)):
                    block.attn.set_processor(processor)
                    seconds = timed(lambda b=block: b(hidden, text, temb, rotary), args.device)
                    times.setdefault((name, kind), []).append(seconds)
                    kept.clear()
    threads = f"cpu, {torch.get_num_threads()} thread(s)"
    device = torch.cuda.get_device_name() if args.device == "cuda" else threads
    print(f"{device}, {dtype}; {args.heads} heads x {HEAD_DIM}, text {args.text}, image {image} tokens")
    for name in ("double", "single"):
        stock_s, capture_s = (statistics.median(times[(name, k)][1:]) for k in ("stock", "capture"))
        print(f"{name} block: stock {stock_s * 1e3:.1f} ms, capture {capture_s * 1e3:.1f} ms, "
              f"ratio {capture_s / stock_s:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
