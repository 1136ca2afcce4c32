"""The toy-world steps of ``make demo`` (the persres commands in between are the real CLI).

    python -m persres.toyworld.demo photos --instance dog,red,striped --out DIR
    python -m persres.toyworld.demo report --base models/toyworld-base --oracle models/toyworld-oracle \
        --residuals RUN/residuals.safetensors --photos DIR --instance dog,red,striped --out DIR

``report`` samples prompts of all six kinds with the base model (class word only) and with the
residuals (normal and LAG) from the same noise, scores them with the oracle, and writes
``report.html``, ``rows.json`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from persres.core.pipeline import load_pipeline
from persres.evaluation.evaluate import Scorers
from persres.files import write_json
from persres.quiet import quiet_third_party
from persres.toyworld.experiment import ToySettings, reference_photos, sample_variants, score_concept
from persres.toyworld.judge import load_judge
from persres.toyworld.prompts import Instance, concept_prompts
from persres.toyworld.quality import means
from persres.toyworld.report import write_toy_report
from persres.toyworld.scenes import CLASSES, COLOURS, HELD_OUT, PATTERNS


def parse_instance(text: str) -> Instance:
    parts = tuple(text.split(","))
    if len(parts) != 3 or parts[0] not in CLASSES or parts[1] not in COLOURS or parts[2] not in PATTERNS:
        raise argparse.ArgumentTypeError(
            f"--instance {text!r} must be class,colour,pattern with class in {', '.join(CLASSES)}, colour in "
            f"{', '.join(COLOURS)}, pattern in {', '.join(PATTERNS)} (held out: "
            f"{'; '.join(','.join(h) for h in HELD_OUT)})"
        )
    return (parts[0], parts[1], parts[2])


def report(args: argparse.Namespace) -> Path:
    settings = ToySettings(images_per_prompt=args.images_per_prompt)
    prompts = concept_prompts(args.instance, per_kind=2)
    pipe = load_pipeline(args.base, torch.float32, torch.device("cpu"))
    variants = sample_variants(pipe, args.residuals, prompts, settings.sampling())
    scorers = Scorers.load(str(args.oracle / "clip"), str(args.oracle / "dino"), device="cpu")
    rows = score_concept(
        variants, prompts, settings.sampling(), load_judge(args.oracle), scorers, args.out, args.photos
    )
    write_json(args.out / "rows.json", rows, overwrite=False)
    summary = means(rows, ("variant",))
    write_json(args.out / "summary.json", summary, overwrite=False)
    for row in summary:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    count = len(list(args.photos.glob("*.png")))
    title = f"persres toy world: {' '.join(args.instance)} (held out) from {count} photos"
    return write_toy_report(rows, args.out, args.photos, args.out / "report.html", title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    photos = sub.add_parser("photos", help="write reference photos of a toy instance")
    photos.add_argument("--instance", type=parse_instance, default=HELD_OUT[0])
    photos.add_argument("--count", type=int, default=5)
    photos.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="sample base/normal/LAG for the six prompt kinds and write a report")
    rep.add_argument("--base", default="models/toyworld-base")
    rep.add_argument("--oracle", type=Path, default=Path("models/toyworld-oracle"))
    rep.add_argument("--residuals", type=Path, required=True)
    rep.add_argument("--photos", type=Path, required=True)
    rep.add_argument("--instance", type=parse_instance, default=HELD_OUT[0])
    rep.add_argument("--images-per-prompt", type=int, default=4)
    rep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "photos":
        reference_photos(args.instance, args.out, args.count)
        print(f"{args.count} photos of {' '.join(args.instance)} in {args.out}")
    else:
        if args.out.exists():
            parser.error(f"--out {args.out} already exists; remove it or choose another folder")
        quiet_third_party()  # as the persres commands: no loading progress bars of the libraries
        print(f"report: {report(args)}")


if __name__ == "__main__":
    main()
