"""One residual training step vs the floor and vs a LoRA step, on the SD 1.5 (or SDXL) U-Net architecture.

The U-Net is built from its published config with random weights (nothing is downloaded).
Measured side by side in one run, interleaved, median of --repeats:

- floor:    forward + backward of the frozen U-Net with respect to its input (no adapter beats it)
- residual: forward + backward + AdamW step of personalized residuals (rank 0.05 m_i)
- lora:     the same with a peft LoRA at rank 4 on to_q, to_k, to_v, to_out.0 (DreamBooth-LoRA's target)

Peak memory: CUDA's max_memory_allocated per method; on the CPU each method runs once more in
a child process that polls its resident memory during the step, above the model's own.

    python bench/train_step.py [--model sd15|sdxl] [--device cpu|cuda] [--latent-size 32] [--batch-size 1]
                               [--repeats 3] [--no-memory]

``--model sdxl`` (2.6B parameters, 10 GB in fp32) keeps one U-Net: the floor runs it with the residuals
bypassed (``residuals_disabled``), and the LoRA comparison is left out (no room for copies on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from persres import add_residuals
from persres.core.residuals import residuals_disabled
from persres.testing.reference_configs import SD15_UNET, SDXL_UNET

METHODS = ("floor", "residual", "lora")
MODELS = {"sd15": ("SD 1.5", SD15_UNET, METHODS), "sdxl": ("SDXL base 1.0", SDXL_UNET, METHODS[:2])}
Step = Callable[[], None]
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, object], torch.Tensor]


def build_unet(model: str, device: str, dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MODELS[model][1]).to(device, dtype)
    unet.requires_grad_(False)
    return unet


def inputs(args: argparse.Namespace, dtype: torch.dtype) -> Batch:
    """Latents, timesteps, the U-Net's conditioning (SDXL: also the pooled text and size ids), target."""
    g = torch.Generator().manual_seed(0)
    size, n, config = args.latent_size, args.batch_size, MODELS[args.model][1]
    latents = torch.randn(n, 4, size, size, generator=g).to(args.device, dtype)
    text = torch.randn(n, 77, config["cross_attention_dim"], generator=g).to(args.device, dtype)
    condition: dict[str, object] = {"encoder_hidden_states": text}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        px = float(size * 8)
        condition["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, pooled, generator=g).to(args.device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * n).to(args.device, dtype),
        }
    steps = torch.randint(1000, (n,), generator=g).to(args.device)
    target = torch.randn(latents.shape, generator=g).to(args.device, dtype)
    return latents, steps, condition, target


def make_step(method: str, unet: UNet2DConditionModel, batch: Batch) -> tuple[Step, int]:
    """A closure running one step of ``method``, and its trainable parameter count."""
    latents, steps, text, target = batch
    if method == "floor":

        def floor() -> None:  # the base model: residuals bypassed where the U-Net is shared
            x = latents.clone().requires_grad_(True)
            with residuals_disabled(unet):
                F.mse_loss(unet(x, steps, **text).sample.float(), target.float()).backward()

        return floor, 0
    if method == "residual":
        params = [p for w in add_residuals(unet).values() for p in (w.A, w.B)]
    else:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train_step() -> None:
        loss = F.mse_loss(unet(latents, steps, **text).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step, sum(p.numel() for p in params)


def timed(step: Step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(method: str, args: argparse.Namespace) -> float:
    """Peak memory of one step of ``method`` above the model's own weights, in MiB."""
    if args.device == "cuda":
        dtype = torch.float16 if args.fp16 else torch.float32
        unet = build_unet(args.model, args.device, dtype)
        step, _ = make_step(method, unet, inputs(args, dtype))
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        del unet, step
        torch.cuda.empty_cache()
        return peak / 2**20
    child = [
        sys.executable,
        __file__,
        "--memory-child",
        method,
        "--model",
        args.model,
        "--latent-size",
        str(args.latent_size),
        "--batch-size",
        str(args.batch_size),
        "--device",
        "cpu",
    ]
    return float(
        subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    )


def memory_child(args: argparse.Namespace) -> None:
    """Poll the resident set every 2 ms during one step (the build's transient peak would hide it)."""
    unet = build_unet(args.model, "cpu", torch.float32)
    step, _ = make_step(args.memory_child, unet, inputs(args, torch.float32))
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=poll)
    watcher.start()
    step()
    done.set()
    watcher.join()
    print((peak[0] - before) / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), default="sd15", help="U-Net architecture")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--latent-size", type=int, default=None, help="latent side (default 64 on GPU, 32 on CPU)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="fp16 base weights (GPU)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--no-memory", action="store_true", help="time the steps only")
    parser.add_argument("--memory-child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.latent_size = args.latent_size or (64 if gpu else 32)
    args.batch_size = args.batch_size or (4 if gpu else 1)
    if args.memory_child:
        memory_child(args)
        return
    dtype = torch.float16 if args.fp16 else torch.float32
    name, _, methods = MODELS[args.model]
    print(
        f"{name} U-Net (random weights), {args.device}, {dtype}, "
        f"latents {args.latent_size}x{args.latent_size} ({args.latent_size * 8} px), "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    base = build_unet(args.model, args.device, dtype)
    batch = inputs(args, dtype)
    steps, counts = {}, {}
    shared = args.model == "sdxl"  # SD 1.5: copies of the same weights, so every step sees identical inputs
    for method in methods:
        unet = base if method == "floor" or shared else copy.deepcopy(base)
        steps[method], counts[method] = make_step(method, unet, batch)
    for method in methods:
        timed(steps[method], args.device)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            times[method].append(timed(steps[method], args.device))
    median = {m: statistics.median(t) for m, t in times.items()}
    del steps, base
    memory = {m: float("nan") if args.no_memory else peak_memory_mb(m, args) for m in methods}
    print(f"{'method':<10}{'median s/step':>15}{'trainable params':>18}{'peak MiB':>12}")
    for method in methods:
        print(f"{method:<10}{median[method]:>15.3f}{counts[method]:>18,}{memory[method]:>12.0f}")
    print(f"residual / floor = {median['residual'] / median['floor']:.3f}  (target <= 1.10)")
    if "lora" in median:
        print(f"residual / lora  = {median['residual'] / median['lora']:.3f}")
    print(f"residual parameters = {counts['residual']:,}")
    if args.json:
        print(json.dumps({"median_s": median, "params": counts, "peak_mib": memory, "times": times}))


if __name__ == "__main__":
    main()
