"""Command line: parse -> config -> one library call per subcommand.

Errors the user can fix (``PersresError``) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from persres import __version__
from persres.commands import (
    run_benchmark,
    run_evaluate,
    run_info,
    run_merge,
    run_report,
    run_sample,
    run_suggest_class,
    run_suggest_token,
    run_train,
)
from persres.config import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_TOKEN, TrainConfig
from persres.errors import PersresError

log = logging.getLogger("persres")

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persres",
        description="Personalized Residuals for Stable Diffusion: teach a concept from a few photos.",
    )
    parser.add_argument("--version", action="version", version=f"persres {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(commands)
    add_sample(commands)
    add_info(commands)
    add_merge(commands)
    add_evaluate(commands)
    add_benchmark(commands)
    add_report(commands)
    add_suggest(commands)
    return parser


def add_suggest(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "suggest-class",
        help="rank WordNet nouns as macro class for a folder of photos (CLIP)",
        description="Mean CLIP image embedding of the photos vs 'a photo of a {noun}.' for 117,798 WordNet "
        "nouns (embeddings cached per CLIP model). nearest = the paper's rule; balanced = the most general "
        "noun within --margin of the best cosine.",
    )
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    add_scorers(p, dino=False)
    p.add_argument("--top", type=int, default=10, help="how many to list (default 10)")
    p.add_argument(
        "--strategy", choices=["nearest", "balanced"], default="nearest", help="which noun comes first"
    )
    p.add_argument("--margin", type=float, default=0.01, help="balanced: cosine margin (default 0.01)")
    p.add_argument("--nouns", help="own noun list (one per line) instead of WordNet")
    p.add_argument("--json", action="store_true", help="print a JSON list of {noun, score, ...}")
    add_device(p)
    p.set_defaults(handler=run_suggest_class)
    p = commands.add_parser(
        "suggest-token",
        help="propose rare single-token identifiers that are not real words",
        description="The rarest whole-word tokens of the base model's tokenizer with 3-4 letters that are "
        "not WordNet nouns, each checked to be one token.",
    )
    p.add_argument("--base", required=True, help="base model (its tokenizer is used): folder or hub id")
    p.add_argument("--top", type=int, default=10, help="how many (default 10)")
    p.set_defaults(handler=run_suggest_token)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def add_scorers(p: argparse.ArgumentParser, dino: bool = True) -> None:
    p.add_argument(
        "--clip", default=DEFAULT_CLIP, help=f"CLIP model: hub id or folder (default {DEFAULT_CLIP})"
    )
    if dino:
        p.add_argument(
            "--dino", default=DEFAULT_DINO, help=f"DINO ViT model: hub id or folder (default {DEFAULT_DINO})"
        )


def add_train(commands: argparse._SubParsersAction) -> None:
    defaults = TrainConfig(base="", images="", class_word="x")
    p = commands.add_parser(
        "train",
        help="train residuals for a concept from a folder of photos",
        description="Train personalized residuals (paper defaults: 150 steps, batch 4, lr 1e-3).",
    )
    p.add_argument("--base", required=True, help="diffusers Stable Diffusion 1.x/2.x folder or hub id")
    p.add_argument("--images", required=True, help="folder of 1-50 photos of the concept (jpg/png/webp)")
    p.add_argument(
        "--class-word",
        required=True,
        help="the macro class, e.g. dog, teapot, sofa; 'auto' picks a WordNet noun with CLIP",
    )
    p.add_argument(
        "--class-strategy",
        choices=["nearest", "balanced"],
        default="nearest",
        help="with --class-word auto: nearest noun (paper) or balanced (more general; default nearest)",
    )
    p.add_argument("--clip", default=DEFAULT_CLIP, help="with --class-word auto: CLIP model")
    p.add_argument("--nouns", help="with --class-word auto: own noun list instead of WordNet")
    p.add_argument(
        "--out", required=True, help="output folder for residuals.safetensors, config.json, checkpoints"
    )
    p.add_argument(
        "--token", default=DEFAULT_TOKEN, help=f"identifier V*, a rare single token (default {DEFAULT_TOKEN})"
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per step (default %(default)s)"
    )
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--rank", default="0.05", help="fraction of each layer's width (0.05) or fixed rank (16)")
    p.add_argument("--init", choices=["zero", "random"], default="zero", help="factor init (default zero)")
    p.add_argument(
        "--resolution",
        type=int,
        default=defaults.resolution,
        help="training size in px (default %(default)s)",
    )
    p.add_argument(
        "--no-flip", action="store_true", help="no random horizontal flips (for asymmetric concepts)"
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="base model precision"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument(
        "--validation-prompt",
        action="append",
        default=[],
        help='sampled into OUT/validation after training, e.g. "a V* dog on the beach"; repeatable',
    )
    p.add_argument("--validation-every", type=int, help="also sample the validation prompts every N steps")
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard", "wandb"],
        default=defaults.report_to,
        help="also log the loss to this tracker, in OUT/logs (default none; OUT/logs/loss.csv always)",
    )
    add_device(p)
    p.set_defaults(handler=run_train)


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
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j (default 0)")
    p.add_argument("--height", type=int, default=None, help="image height in px (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in px (default: the model's)")
    add_device(p)
    p.add_argument("--precision", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16")
    p.set_defaults(handler=run_sample)


def add_info(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="print what a residual file holds, as JSON")
    p.add_argument("file", help="a residuals.safetensors file")
    p.set_defaults(handler=run_info)


def add_merge(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "merge",
        help="write a full pipeline with the residuals folded into the U-Net",
        description="The result loads with plain StableDiffusionPipeline.from_pretrained.",
    )
    p.add_argument("--base", required=True, help="the base model the residuals were trained on")
    p.add_argument("--residuals", required=True, help="residuals.safetensors of a training run")
    p.add_argument("--out", required=True, help="new folder for the merged diffusers pipeline")
    p.set_defaults(handler=run_merge)


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate",
        help="score generated images: CLIP text alignment, CLIP and DINO image alignment",
        description="CustomConcept101 semantics: clip_t = 2.5 * max(cos, 0) with the identifier removed from "
        "the prompt; clip_i and dino_i = mean cosine over all (generated, reference) pairs.",
    )
    p.add_argument(
        "--images", required=True, help="folder of generated images (sidecars from persres sample are read)"
    )
    p.add_argument("--references", required=True, help="folder of the concept's reference photos")
    p.add_argument("--prompt", help="prompt of every image, when the images have no JSON sidecars")
    p.add_argument("--token", help="identifier word to remove from prompts (V*, V1*, <new1> always are)")
    add_scorers(p)
    add_device(p)
    p.add_argument("--out", help="write the JSON here too (never over an existing file)")
    p.set_defaults(handler=run_evaluate)


def add_benchmark(commands: argparse._SubParsersAction) -> None:
    defaults = TrainConfig(base="", images="", class_word="x")
    p = commands.add_parser(
        "benchmark",
        help="train, sample and score every concept of a CustomConcept101-format dataset",
        description="Resumable; under `accelerate launch -m persres benchmark ...` the concepts are split "
        "across processes. Writes results.csv and summary.json in --out.",
    )
    p.add_argument(
        "--dataset", required=True, help="folder with dataset.json, image folders and prompt files"
    )
    p.add_argument("--base", required=True, help="base model: diffusers folder or hub id")
    p.add_argument("--out", required=True, help="output folder (rerun with the same --out to resume)")
    p.add_argument("--rank", action="append", help="rank variant(s): 0.05 (default), 16, ...; repeatable")
    p.add_argument(
        "--sampler",
        action="append",
        choices=["normal", "lag", "auto"],
        help="sampler rows; repeatable (default: normal, lag and auto)",
    )
    p.add_argument("--images-per-prompt", type=int, default=5, help="images per prompt (default 5)")
    p.add_argument(
        "--max-prompts", type=int, default=None, help="use only the first N prompts of each concept"
    )
    p.add_argument("--concept", action="append", default=[], help="only this image folder name; repeatable")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    p.add_argument("--lr", type=float, default=defaults.lr, help="default %(default)s")
    p.add_argument(
        "--resolution", type=int, default=defaults.resolution, help="training px (default %(default)s)"
    )
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips in training")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="default 7.5")
    p.add_argument("--height", type=int, default=None, help="sample height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="sample width (default: the model's)")
    add_scorers(p)
    p.add_argument(
        "--class-source",
        action="append",
        choices=["dataset", "nearest", "balanced"],
        help="where the class word comes from; repeatable to compare (supplement Table 4; default dataset)",
    )
    p.add_argument("--nouns", help="with nearest/balanced: own noun list instead of WordNet")
    add_device(p)
    p.set_defaults(handler=run_benchmark)


def add_report(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("report", help="write a self-contained HTML report of a benchmark folder")
    p.add_argument("results", help="the --out folder of persres benchmark")
    p.add_argument("--out", help="HTML file to write (default RESULTS/report.html; never overwritten)")
    p.set_defaults(handler=run_report)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is first imported
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    quiet_third_party()
    try:
        return int(args.handler(args))
    except PersresError as exc:
        print(f"persres {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"persres {args.command}: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


def quiet_third_party() -> None:
    """Library progress bars and advice on loading stay out of the user's terminal."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
