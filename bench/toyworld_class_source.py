"""Where the class word comes from, in the toy world (the layout of supplement Table 4).

    python bench/toyworld_class_source.py [--concepts 5] [--images 4] [--steps 400]
        [--out bench-output/toyworld-class]

Held-out concepts, one prompt of each of the six kinds, run through ``persres benchmark`` twice: with
the dataset's class word, and with the toy noun nearest to the photos by the oracle CLIP (the paper's
rule; ``balanced`` needs WordNet depths the toy nouns lack, so it would equal ``nearest``). Scores:
the benchmark's oracle CLIP-T / CLIP-I / DINO-I, and the judge's identity (class, pattern, colour
unless changed; see ``persres.toyworld.quality``). 2-core CPU: about 2 minutes per concept and source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from toybench import md_row, parse_fresh, toy_parser

from persres.config import TrainConfig
from persres.evaluation.benchmark import BenchmarkConfig, run_benchmark
from persres.files import write_text
from persres.inference.sampling import SampleSettings
from persres.toyworld.dataset import concept_name, toy_nouns, write_cc101
from persres.toyworld.experiment import ToySettings, reference_photos
from persres.toyworld.judge import Judge, load_judge, read_images
from persres.toyworld.prompts import Instance, ToyPrompt, concept_prompts
from persres.toyworld.quality import check
from persres.toyworld.scenes import HELD_OUT

SOURCES = ("dataset", "nearest")


def templates(prompts: list[ToyPrompt], cls: str) -> list[str]:
    return [p.text.replace(f"V* {cls}", "{}") for p in prompts]


def judge_rows(judge: Judge, result: Path, prompts: list[ToyPrompt], cls: str) -> list[dict[str, Any]]:
    """The judge's identity for every image of one benchmark variant."""
    data = json.loads(result.read_text())
    chosen = data["rows"][0]["class_word"]
    expect = {
        t.format(f"V* {chosen}"): p.expect for t, p in zip(templates(prompts, cls), prompts, strict=True)
    }
    images = data["images"]
    pixels = [np.asarray(Image.open(result.parent / "samples" / i["image"]).convert("RGB")) for i in images]
    rows = []
    for image, read in zip(images, read_images(judge, pixels), strict=True):
        score = check(read, expect[image["prompt"]])
        rows.append({"sampler": image["sampler"], "class_word": chosen, "identity": score["identity"]})
    return rows


def write_concepts(out: Path, count: int, toy: ToySettings) -> list[tuple[Instance, Path, list[ToyPrompt]]]:
    concepts = []
    for index, instance in enumerate(HELD_OUT[:count]):
        photos = reference_photos(instance, out / "photos" / concept_name(instance), toy.photos)
        concepts.append((instance, photos, concept_prompts(instance, per_kind=1, offset=index)))
    return concepts


def benchmark_config(
    args: argparse.Namespace, dataset: Path, nouns: Path, toy: ToySettings
) -> BenchmarkConfig:
    template = TrainConfig(
        base=args.base,
        images="-",  # per concept, filled in by the benchmark
        class_word="-",
        steps=toy.steps,
        batch_size=toy.batch_size,
        lr=toy.lr,
        resolution=32,
        flip=False,
        checkpoint_every=toy.steps,
    )
    return BenchmarkConfig(
        dataset=str(dataset),
        base=args.base,
        out=str(args.out / "benchmark"),
        ranks=(toy.rank,),
        samplers=("normal", "lag"),
        images_per_prompt=args.images,
        train=template,
        sample=SampleSettings(toy.sample_steps, toy.guidance),
        clip=str(args.oracle / "clip"),
        dino=str(args.oracle / "dino"),
        class_sources=SOURCES,
        nouns=str(nouns),
    )


def print_tables(
    judge: Judge, out: Path, concepts: list[tuple[Instance, Path, list[ToyPrompt]]], rank: float | int
) -> None:
    identity: dict[str, list[float]] = {}
    print(
        md_row("concept", "class source", "class word", "sampler", "judge identity")
        + "\n|---|---|---|---|---:|"
    )
    for instance, _, prompts in concepts:
        for source in SOURCES:
            folder = f"rank-{rank}" + ("" if source == "dataset" else f"-class-{source}")
            result = out / "runs" / concept_name(instance) / folder / "result.json"
            rows = judge_rows(judge, result, prompts, instance[0])
            for sampler in ("normal", "lag"):
                mine = [r["identity"] for r in rows if r["sampler"] == sampler]
                identity.setdefault(f"{source} {sampler}", []).extend(mine)
                print(
                    md_row(" ".join(instance), source, rows[0]["class_word"], sampler, float(np.mean(mine)))
                )
    summary = json.loads((out / "summary.json").read_text())["overall"]
    print(
        "\n"
        + md_row("variant", "clip_t", "clip_i", "dino_i", "judge identity")
        + "\n|---|---:|---:|---:|---:|"
    )
    for key, m in summary.items():
        source = "nearest" if "class=nearest" in key else "dataset"
        judged = float(np.mean(identity[f"{source} {key.rsplit('sampler=', 1)[1]}"]))
        print(md_row(key, m["clip_t"], m["clip_i"], m["dino_i"], judged))


def main() -> None:
    parser = toy_parser(__doc__, "bench-output/toyworld-class")
    parser.add_argument("--steps", type=int, default=ToySettings.steps, help="training steps")
    args = parse_fresh(parser)
    toy = ToySettings(steps=args.steps)
    concepts = write_concepts(args.out, args.concepts, toy)
    dataset = write_cc101(args.out / "dataset", [(i, ph, templates(pr, i[0])) for i, ph, pr in concepts])
    nouns = write_text(args.out / "nouns.txt", "\n".join(toy_nouns()) + "\n")
    out = run_benchmark(benchmark_config(args, dataset, nouns, toy), device="cpu", progress=False)
    print_tables(load_judge(args.oracle), out, concepts, toy.rank)


if __name__ == "__main__":
    main()
