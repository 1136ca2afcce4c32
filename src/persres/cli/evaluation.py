"""``persres evaluate``, ``persres benchmark`` and ``persres report``: measuring concepts."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from persres.cli.generation import add_sampling, settings_of
from persres.cli.options import COUNT, add_device, add_scorers, rank
from persres.cli.training import add_recipe, native_resolution
from persres.errors import ConfigError, OutputExistsError
from persres.methods.catalog import DEFAULT_METHOD, METHODS, names_where
from persres.methods.recipes import RECIPE_FIELDS, Overrides, train_config

if TYPE_CHECKING:
    from persres.evaluation.benchmark_plan import BenchmarkConfig


def register(commands: argparse._SubParsersAction) -> None:
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
    add_benchmark(commands)
    p = commands.add_parser("report", help="write a self-contained HTML report of a benchmark folder")
    p.add_argument("results", help="the --out folder of persres benchmark")
    p.add_argument("--out", help="HTML file to write (default RESULTS/report.html; never overwritten)")
    p.set_defaults(handler=run_report)


def add_benchmark(commands: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--method",
        action="append",
        choices=list(METHODS),
        help="method(s) to compare on the same prompts and seeds; repeatable (default residuals). Each "
        "trains with its authors' recipe unless --steps, --batch-size or --lr is given",
    )
    p.add_argument(
        "--rank",
        action="append",
        type=rank,
        help="residuals' rank variant(s): 0.05 (default), 16, ...; repeatable",
    )
    p.add_argument(
        "--sampler",
        action="append",
        choices=["normal", "lag", "auto"],
        help="residuals' sampler rows; repeatable (default: normal, lag and auto; the other methods: "
        "normal only)",
    )
    p.add_argument("--images-per-prompt", type=COUNT, default=5, help="images per prompt (default 5)")
    p.add_argument(
        "--max-prompts", type=COUNT, default=None, help="use only the first N prompts of each concept"
    )
    p.add_argument("--concept", action="append", default=[], help="only this image folder name; repeatable")
    add_recipe(p, by_method=True, every_method=True)
    add_sampling(p, steps_flag="--sample-steps")
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


def run_evaluate(args: argparse.Namespace) -> int:
    from persres.evaluation.evaluate import Scorers, evaluate_folder
    from persres.files import check_apart, check_writable, write_json

    if args.out:
        if os.path.exists(args.out):
            raise OutputExistsError(f"--out {args.out} already exists; choose another file")
        check_writable(args.out, "out", folder=False)
        inputs = {"images": args.images, "references": args.references, "clip": args.clip}
        check_apart(args.out, "out", [*inputs.items(), ("dino", args.dino)], folder=False)
    scorers = Scorers.load(args.clip, args.dino, args.device)
    result = evaluate_folder(args.images, args.references, args.prompt, args.token, scorers)
    if args.out:
        write_json(args.out, result, overwrite=False)
    print(json.dumps(result, indent=2))
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from persres.evaluation.benchmark import run_benchmark
    from persres.files import check_writable

    check_writable(args.out, "out")  # before anything reads the base model (e.g. its default resolution)
    out = run_benchmark(benchmark_config_of(args), args.device)
    print(f"results: {out / 'results.csv'}, summary: {out / 'summary.json'}")
    return 0


def benchmark_config_of(args: argparse.Namespace) -> BenchmarkConfig:
    """The benchmark ``persres benchmark`` was asked for. Its training template is the default method's
    recipe, each of steps, batch size and lr replaced where given (and then shared by every method)."""
    from persres.backbones import rank_default_for
    from persres.evaluation.benchmark import BenchmarkConfig

    methods = tuple(args.method or [DEFAULT_METHOD])
    if args.rank is not None and not any(METHODS[m].trains_residuals for m in methods):
        raise ConfigError(
            f"--rank applies to --method {', '.join(names_where(True, 'trains_residuals'))} only (given: "
            f"{', '.join(methods)}); drop --rank or add --method {DEFAULT_METHOD}"
        )
    given = {name: getattr(args, name) for name in RECIPE_FIELDS if getattr(args, name) is not None}
    template = train_config(
        DEFAULT_METHOD,
        args.base,
        "-",
        "-",
        Overrides(**given),
        resolution=args.resolution or native_resolution(args.base),
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        flip=not args.no_flip,
    )
    lag = any(METHODS[m].samples_with_lag for m in methods)
    return BenchmarkConfig(
        dataset=args.dataset,
        base=args.base,
        out=args.out,
        ranks=tuple(args.rank or [rank_default_for(args.base)]),
        samplers=tuple(args.sampler or (["normal", "lag", "auto"] if lag else ["normal"])),
        images_per_prompt=args.images_per_prompt,
        max_prompts=args.max_prompts,
        concepts=tuple(args.concept),
        train=template,
        sample=settings_of(args, num_images=1),
        clip=args.clip,
        dino=args.dino,
        class_sources=tuple(args.class_source or ["dataset"]),
        nouns=args.nouns,
        methods=methods,
        shared_recipe=tuple(given),
    )


def run_report(args: argparse.Namespace) -> int:
    from persres.evaluation.report import write_report

    print(f"report: {write_report(args.results, args.out)}")
    return 0
