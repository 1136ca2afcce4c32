"""One residual training step vs the floor and vs a LoRA step, on the SD 1.5 (or SDXL) U-Net architecture,
or on the Flux.1-dev transformer at full width and reduced depth.

The denoiser is built from its published config with random weights (nothing is downloaded).
Measured side by side in one run, interleaved, median of --repeats:

- floor:    forward + backward of the frozen U-Net with respect to its input (no adapter beats it)
- residual: forward + backward + AdamW step of personalized residuals at the base's default rank
            (0.05 m_i on SD; the fixed rank 21 on Flux)
- lora:     the same with a peft LoRA at rank 4 on the backbone's LoRA targets (the U-Net: to_q, to_k,
            to_v, to_out.0, DreamBooth-LoRA's; Flux: diffusers' Flux DreamBooth-LoRA default layers)
- residual-int8: the residual step on the base with 8-bit linear weights (``quantize_base`` int8, torchao)

Memory, per method: the model's weights (their tensors' bytes, counted: int8 values and scales for
residual-int8) and one step's peak above the model, CUDA's max_memory_allocated, or on the CPU the
resident set of a child process that builds the model alone and polls its memory during one step.

    python bench/train_step.py [--model sd15|sdxl|flux] [--device cpu|cuda] [--latent-size 32]
                               [--batch-size 1] [--repeats 3] [--no-memory]

``--model sdxl`` (2.6B parameters, 10 GB in fp32) keeps one U-Net: the floor runs it with the residuals
bypassed (``residuals_disabled``); LoRA and residual-int8 are left out (no room for copies on a CPU).

``--model flux``: the Flux.1-dev transformer (width 3072, T5 width 4096, guidance embedding) with
FLUX_BLOCKS double- and single-stream blocks (the published model has 19 and 38: the same 1:2 mix), called
as the Flux backbone calls it in training (``FluxBackbone.predict``: 16-channel latents packed 2x2 with
image ids, timestep / 1000, guidance 1.0), FLUX_TEXT_TOKENS T5 positions with zero text ids and a pooled
CLIP embedding; 32x32 latents give 256 image tokens. The floor and the residual share one transformer, as
on SDXL; LoRA and residual-int8 get copies. It also prints the parameter arithmetic of the full published
transformer, built on the meta device, and the estimated bf16 memory of training it on a GPU.
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
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import nn

from persres import add_residuals
from persres.backbones import backbone_of_denoiser
from persres.backbones.flux import DEFAULT_RANK, FLUX, FluxConditioning
from persres.config import ResidualConfig
from persres.core.quantize import is_quantized, quantize_denoiser
from persres.core.residuals import count_parameters, residuals_disabled
from persres.testing.reference_configs import FLUX_DEV_TRANSFORMER, SD15_UNET, SDXL_UNET

METHODS = ("floor", "residual", "lora", "residual-int8")
MODELS = {
    "sd15": ("SD 1.5 U-Net", SD15_UNET, METHODS),
    "sdxl": ("SDXL base 1.0 U-Net", SDXL_UNET, METHODS[:2]),
    "flux": ("Flux.1-dev transformer", FLUX_DEV_TRANSFORMER, METHODS),
}
SHARED = ("sdxl", "flux")  # the floor and the residual share one denoiser (no room for more copies)
FLUX_BLOCKS = {"num_layers": 2, "num_single_layers": 4}  # of 19 and 38 in the published model
FLUX_TEXT_TOKENS = 64  # T5 positions (512 in training); 64 keeps a CPU step within seconds
GIB = 2**30
TEXT_ENCODERS = 4_885_371_136  # Flux.1's T5-XXL encoder + CLIP-L text model, parameters
FLUX_RANKS: dict[str, float | int] = {f"rank {DEFAULT_RANK} (default)": DEFAULT_RANK, "rank 0.05 m": 0.05}
Step = Callable[[], None]
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, object] | FluxConditioning, torch.Tensor]


def build_unet(model: str, device: str, dtype: torch.dtype) -> nn.Module:
    """The denoiser with random weights, frozen: the U-Net, or the Flux transformer at FLUX_BLOCKS."""
    torch.manual_seed(0)
    if model == "flux":
        unet: nn.Module = FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **FLUX_BLOCKS})
    else:
        unet = UNet2DConditionModel(**MODELS[model][1])
    unet = unet.to(device, dtype)
    unet.requires_grad_(False)
    return unet


def predict(unet: nn.Module, latents: torch.Tensor, steps: torch.Tensor, text: object) -> torch.Tensor:
    """The denoiser's output for ``latents``; Flux as its backbone calls it in training (packed, ids)."""
    if isinstance(text, FluxConditioning):
        return FLUX.predict(argparse.Namespace(transformer=unet), unet, latents, steps, text)
    assert isinstance(text, dict)
    return unet(latents, steps, **text).sample


def flux_inputs(args: argparse.Namespace, dtype: torch.dtype) -> Batch:
    """16-channel latents, timesteps in [0, 1000), T5 sequence + pooled CLIP + zero text ids, target."""
    g = torch.Generator().manual_seed(0)
    size, n, config = args.latent_size, args.batch_size, FLUX_DEV_TRANSFORMER
    latents = torch.randn(n, 16, size, size, generator=g).to(args.device, dtype)
    hidden = torch.randn(1, FLUX_TEXT_TOKENS, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    condition = FluxConditioning(
        hidden.to(args.device, dtype), pooled.to(args.device, dtype), torch.zeros(FLUX_TEXT_TOKENS, 3)
    )
    steps = (torch.rand(n, generator=g) * 1000).to(args.device)
    target = torch.randn(latents.shape, generator=g).to(args.device, dtype)
    return latents, steps, condition, target


def inputs(args: argparse.Namespace, dtype: torch.dtype) -> Batch:
    """Latents, timesteps, the U-Net's conditioning (SDXL: also the pooled text and size ids), target."""
    if args.model == "flux":
        return flux_inputs(args, dtype)
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


def make_step(method: str, unet: nn.Module, batch: Batch) -> tuple[Step, int]:
    """A closure running one step of ``method``, and its trainable parameter count."""
    latents, steps, text, target = batch
    if method == "floor":

        def floor() -> None:  # the base model: residuals bypassed where the U-Net is shared
            x = latents.clone().requires_grad_(True)
            with residuals_disabled(unet):
                F.mse_loss(predict(unet, x, steps, text).float(), target.float()).backward()

        return floor, 0
    if method in ("residual", "residual-int8"):
        if method == "residual-int8":
            quantize_denoiser(unet, "int8")
        config = ResidualConfig(rank=backbone_of_denoiser(unet).rank_default)
        params = [p for w in add_residuals(unet, config).values() for p in (w.A, w.B)]
    else:
        from peft import LoraConfig

        unet.add_adapter(  # type: ignore[operator]
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=list(backbone_of_denoiser(unet).lora_targets),
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train_step() -> None:
        loss = F.mse_loss(predict(unet, latents, steps, text).float(), target.float())
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


def weights_mib(model: nn.Module) -> float:
    """The bytes of the model's parameters and buffers: an int8 weight counts its values and scales."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        parts = [tensor.qdata, tensor.scale] if is_quantized(tensor) else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total / 2**20


def peak_memory_mb(method: str, args: argparse.Namespace) -> float:
    """One step's peak memory for ``method`` above the model's own, in MiB."""
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
    out = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def memory_child(args: argparse.Namespace) -> None:
    """Poll the resident set every 2 ms during one step (the build's transient peak would hide it)."""
    process = psutil.Process()
    unet = build_unet(args.model, "cpu", torch.float32)
    step, _ = make_step(args.memory_child, unet, inputs(args, torch.float32))
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


def meta_flux() -> nn.Module:
    """The full published Flux.1-dev transformer on the meta device (no weight allocated)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)


def flux_arithmetic() -> dict[str, int]:
    """Print the full published transformer's residual layers and parameters (counted on the meta device)
    and the bf16 GPU memory of training them (estimated: weights, gradients and AdamW state only)."""
    base = sum(p.numel() for p in meta_flux().parameters())
    counts = {"base": base, "text_encoders": TEXT_ENCODERS}
    for label, rank in FLUX_RANKS.items():
        residuals = add_residuals(meta_flux(), ResidualConfig(rank=rank))
        counts[label], counts["layers"] = count_parameters(residuals), len(residuals)
    layers = counts["layers"]
    print(f"\nFull Flux.1-dev transformer (meta device): {base:,} parameters, {layers} residual layers")
    print("GPU memory in bf16, ESTIMATED from parameter counts (activations and CUDA context not included):")
    print(f"  base transformer, 2 bytes/param: {base * 2 / GIB:.2f} GiB ({base * 1 / GIB:.2f} GiB if 8-bit)")
    text = TEXT_ENCODERS * 2 / GIB
    print(f"  T5-XXL + CLIP-L, 2 bytes/param (freed by --release-text-encoders): {text:.2f} GiB")
    for label in FLUX_RANKS:
        n = counts[label]
        print(
            f"  residuals at {label}: {n:,} params ({n / base:.3%} of the base); fp32 factors, gradients "
            f"and AdamW's two moments, 16 bytes/param: {n * 16 / GIB:.2f} GiB"
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), default="sd15", help="denoiser architecture")
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
        f"{name} (random weights), {args.device}, {dtype}, "
        f"latents {args.latent_size}x{args.latent_size} ({args.latent_size * 8} px), "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    if args.model == "flux":
        print(
            f"  {FLUX_BLOCKS['num_layers']} double + {FLUX_BLOCKS['num_single_layers']} single blocks, "
            f"{(args.latent_size // 2) ** 2} image tokens, {FLUX_TEXT_TOKENS} text tokens, guidance 1.0"
        )
    base = build_unet(args.model, args.device, dtype)
    batch = inputs(args, dtype)
    steps, counts = {}, {}
    shared = args.model in SHARED  # SD 1.5: copies of the same weights, so every step sees identical inputs
    # copies first, of the bare base: then no method's adapter is in another's model
    alone = ("floor", "residual") if shared else ("floor",)
    models = {m: base if m in alone else copy.deepcopy(base) for m in methods}
    for method in methods:
        steps[method], counts[method] = make_step(method, models[method], batch)
    weights = {m: weights_mib(models[m]) for m in methods}
    for method in methods:
        timed(steps[method], args.device)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            times[method].append(timed(steps[method], args.device))
    median = {m: statistics.median(t) for m, t in times.items()}
    del steps, base, models
    memory = {m: float("nan") if args.no_memory else peak_memory_mb(m, args) for m in methods}
    header = f"{'method':<14}{'median s/step':>15}{'trainable params':>18}{'weights MiB':>13}"
    print(f"{header}{'step peak MiB':>15}")
    for method in methods:
        row = f"{method:<14}{median[method]:>15.3f}{counts[method]:>18,}{weights[method]:>13.0f}"
        print(f"{row}{memory[method]:>15.0f}")
    print(f"residual / floor = {median['residual'] / median['floor']:.3f}  (target <= 1.10)")
    if "lora" in median:
        print(f"residual / lora  = {median['residual'] / median['lora']:.3f}")
    if "residual-int8" in median:
        print(f"residual-int8 / residual = {median['residual-int8'] / median['residual']:.3f}")
        print(f"weights int8 / full = {weights['residual-int8'] / weights['residual']:.3f}")
    print(f"residual parameters = {counts['residual']:,}")
    for method in methods:
        print(f"{method} single steps: {min(times[method]):.3f}-{max(times[method]):.3f} s")
    full = flux_arithmetic() if args.model == "flux" else {}
    if args.json:
        figures = {
            "median_s": median, "params": counts, "weights_mib": weights, "peak_mib": memory, "times": times,
            "full": full,
        }  # fmt: skip
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
