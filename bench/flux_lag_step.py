"""Time per denoising step on Flux through persres' sampler: LAG vs normal.

A ``FluxPipeline`` whose transformer is the published Flux.1-dev config (``FLUX_DEV_TRANSFORMER``: width
3072, 24 heads x 128, T5 width 4096, pooled CLIP width 768, guidance embedding) at reduced depth (1
double-stream + 2 single-stream blocks by default), random weights, fp32, with random non-zero residuals
(``init`` random) at the Flux default rank on its 3 residual layers. The text encoders are toy-depth
random models with Flux.1's output widths (T5 4096, CLIP 768), so the transformer is called exactly as
the published one; the toy VAE downsamples 2x, so 64 x 64 px gives the 32 x 32 16-channel latents, packed
2 x 2 into 256 image tokens, that Flux.1's 8x VAE gives at 256 x 256 px. 512 T5 positions (the
pipeline's ``max_sequence_length``), as LAG reads them.

Both samplers run ``persres.inference.sampling.sample`` (``sampler`` "normal" / "lag") on the prompt
"a photo of a V* dog", as ``persres sample`` does; one denoising step is one transformer call (Flux.1-dev
is guidance-distilled: batch 1, no classifier-free batch), timed by hooks on the transformer; LAG's
processors are swapped in once per image, outside the steps, and counted in the image time. Each step is
timed in this process's CPU seconds (one thread: its own work, steady when other jobs share the machine)
and in wall seconds. Interleaved repeats after a warm-up round; medians.

    OMP_NUM_THREADS=1 python bench/flux_lag_step.py [--double 1] [--single 2] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from persres import add_residuals
from persres.backbones.flux import DEFAULT_RANK
from persres.config import ResidualConfig, SampleSettings
from persres.formats.concepts import Concept
from persres.inference.sampling import sample
from persres.testing.reference_configs import FLUX_DEV_TRANSFORMER
from persres.testing.tiny import tiny_flux_pipeline, tiny_text_config


def build(double: int, single: int) -> FluxPipeline:
    """The pipeline: toy encoders and VAE, the published transformer at ``double`` + ``single`` blocks."""
    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    t5 = pipe.text_encoder_2.config
    t5.d_model = FLUX_DEV_TRANSFORMER["joint_attention_dim"]  # 4096, T5-XXL's width
    pipe.text_encoder_2 = T5EncoderModel(t5).eval()
    clip = tiny_text_config(pipe.tokenizer, hidden_size=FLUX_DEV_TRANSFORMER["pooled_projection_dim"])
    pipe.text_encoder = CLIPTextModel(clip).eval()  # CLIP-L's pooled width, 768
    config = {**FLUX_DEV_TRANSFORMER, "num_layers": double, "num_single_layers": single}
    pipe.transformer = FluxTransformer2DModel(**config).eval()
    add_residuals(pipe.transformer, ResidualConfig(rank=DEFAULT_RANK, init="random"),
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time (one thread: its own work, whatever else runs)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=64, help="pixels per side (toy VAE: 2x downsampling)")
    args = parser.parse_args()
    start = time.perf_counter()
    pipe = build(args.double, args.single)
    built = time.perf_counter() - start
    calls: list[tuple[float, float]] = []  # (wall, cpu) seconds of each transformer call
    begun: list[tuple[float, float]] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: begun.append(clocks()))
    pipe.transformer.register_forward_hook(lambda *_: calls.append(since(begun.pop())))
    concepts = [Concept("sks", "dog")]
    settings = SampleSettings(steps=args.steps, height=args.side, width=args.side)
    walls: dict[str, list[float]] = {"normal": [], "lag": []}
    cpus: dict[str, list[float]] = {"normal": [], "lag": []}
    images: dict[str, list[float]] = {"normal": [], "lag": []}
    tokens = 0
    for round_ in range(args.repeats + 1):  # the first round warms up
        for kind in ("normal", "lag"):
            calls.clear()
            begin = clocks()
            [result] = sample(pipe, ["a photo of a V* dog"], concepts, settings, kind, progress=False)
            image = since(begin)
            assert result.sampler == kind and len(calls) == args.steps
            tokens = result.latent_size[0] * result.latent_size[1] // 4
            if round_:
                walls[kind] += [wall for wall, _ in calls]
                cpus[kind] += [cpu for _, cpu in calls]
                images[kind].append(image[1])
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"cpu, {torch.get_num_threads()} thread(s), float32; Flux.1-dev transformer at width 3072, "
          f"{args.double} double + {args.single} single blocks ({parameters:,} parameters, built in "
          f"{built:.0f} s); {tokens} image tokens + 512 text; rank {DEFAULT_RANK} residuals, init random; "
          f"{args.steps} steps x {args.repeats} repeats per sampler; median (range)")  # fmt: skip
    for kind in ("normal", "lag"):
        print(f"{kind}: cpu {summary(cpus[kind])} s/step, wall {summary(walls[kind])} s/step; "
              f"cpu {summary(images[kind])} s/image")  # fmt: skip
    ratio = {name: statistics.median(v["lag"]) / statistics.median(v["normal"])
             for name, v in (("cpu", cpus), ("wall", walls), ("image", images))}  # fmt: skip
    print(
        f"LAG / normal per step: cpu {ratio['cpu']:.3f}, wall {ratio['wall']:.3f}; "
        f"per image (cpu) {ratio['image']:.3f}"
    )


if __name__ == "__main__":
    main()
