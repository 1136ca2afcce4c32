"""``persres sample``, ``persres info`` and ``persres merge``: using a trained concept.
Defaults come from ``SampleSettings``."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from persres.cli.options import COUNT, GUIDANCE, PIXELS, SEED, STEPS, add_device
from persres.config import QUANTIZE_BASE, SampleSettings

DEFAULTS = {f.name: f.default for f in fields(SampleSettings)}


def register(commands: argparse._SubParsersAction) -> None:
    add_sample(commands)
    p = commands.add_parser("info", help="print what a residual file holds, as JSON")
    p.add_argument("file", help="a residuals.safetensors file, or a training run's folder")
    p.set_defaults(handler=run_info)
    p = commands.add_parser(
        "merge",
        help="write a full pipeline with the residuals folded into the U-Net",
        description="The result loads with plain StableDiffusionPipeline.from_pretrained.",
    )
    p.add_argument("--base", required=True, help="the base model the residuals were trained on")
    p.add_argument("--residuals", required=True, help="residuals.safetensors of a training run")
    p.add_argument("--out", required=True, help="new folder for the merged diffusers pipeline")
    p.set_defaults(handler=run_merge)


def add_sample(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sample",
        help="generate images with trained residuals",
        description="Sample with DDIM; V* in a prompt stands for the concept's identifier "
        "(V1*, V2*, ... for several --residuals, in their order).",
    )
    p.add_argument("--base", required=True, help="the base model the residuals were trained on")
    p.add_argument(
        "--residuals",
        action="append",
        required=True,
        help="residuals.safetensors of a training run; repeat for several concepts (V1*, V2*, ...)",
    )
    p.add_argument(
        "--prompt", action="append", required=True, help='e.g. "a photo of a V* dog on the beach"; repeatable'
    )
    p.add_argument(
        "--sampler",
        choices=["normal", "lag", "both"],
        default="normal",
        help="normal: residuals everywhere; lag: only where the concept's cross-attention is; "
        "both: the two from the same noise plus a side-by-side grid (default normal)",
    )
    p.add_argument(
        "--save-masks", action="store_true", help="lag/both: write LAG's masks per step and resolution"
    )
    p.add_argument("--out", required=True, help="folder for the PNGs and their JSON sidecars")
    p.add_argument(
        "--num-images",
        type=COUNT,
        default=DEFAULTS["num_images"],
        help="images per prompt (default %(default)s)",
    )
    add_sampling(p, steps_flag="--steps")
    p.add_argument(
        "--seed",
        type=SEED,
        default=DEFAULTS["seed"],
        help="image j of each prompt uses seed + j (default %(default)s)",
    )
    add_device(p)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16",
    )
    p.add_argument(
        "--quantize-base",
        choices=QUANTIZE_BASE,
        default="no",
        help="int8: the base's linear weights in 8 bits (torchao); residuals, LoRA and textual-inversion "
        "runs (default no)",
    )
    p.set_defaults(handler=run_sample)


def add_sampling(p: argparse.ArgumentParser, steps_flag: str) -> None:
    """Sampling steps, guidance and image size; shared with ``persres benchmark`` (as --sample-steps)."""
    p.add_argument(
        steps_flag,
        dest="sample_steps",
        type=STEPS,
        default=DEFAULTS["steps"],
        help="DDIM steps (default %(default)s)",
    )
    p.add_argument(
        "--guidance",
        type=GUIDANCE,
        default=DEFAULTS["guidance"],
        help="guidance scale (default: the base's; 7.5 classifier-free on Stable Diffusion, the distilled "
        "guidance 3.5 on Flux.1-dev)",
    )
    p.add_argument("--height", type=PIXELS, default=None, help="image height in px (default: the model's)")
    p.add_argument("--width", type=PIXELS, default=None, help="image width in px (default: the model's)")


def settings_of(args: argparse.Namespace, num_images: int) -> SampleSettings:
    return SampleSettings(
        steps=args.sample_steps,
        guidance=args.guidance,
        num_images=num_images,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )


def run_sample(args: argparse.Namespace) -> int:
    from persres.inference.personalized import sample_to_folder

    settings = settings_of(args, args.num_images)
    written = sample_to_folder(
        args.base,
        args.residuals,
        args.prompt,
        args.out,
        settings,
        args.sampler,
        args.save_masks,
        args.device,
        args.precision,
        args.quantize_base,
    )
    for path in written:
        print(path)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from persres.formats.info import describe  # reads the file's header only: no torch

    print(json.dumps(describe(args.file), indent=2))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from persres.inference.merge import merge_to_folder

    print(f"merged pipeline written to {merge_to_folder(args.base, args.residuals, args.out)}")
    return 0
