"""Quality of the method in the toy world, measured by the oracle (see bench/RESULTS.md).

    python bench/toyworld_quality.py [--concepts 5] [--ranks 0.02 0.05 0.2] [--out bench-output/toyworld]

1. Base model: does it draw what captions ask (background, class, colour, pattern, style, second
   object)? Full generator captions of training instances and of the held-out instances.
2. Held-out concepts x prompts of the six kinds, base (class word only) / personalized normal /
   personalized LAG from the same noise: identity, text, oracle CLIP-T/CLIP-I/DINO-I, border change.
3. Rank sweep (supplement Table 5): the same at several ranks.

Prints markdown tables and writes every row to ``--out`` (JSON). 2-core CPU: about 6 minutes for the
base model's captions, then 4-5 minutes per concept and rank (under a minute of it training).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from toybench import md_table, parse_fresh, toy_parser

from persres.backbones import backbone_of
from persres.config import ResidualConfig
from persres.core.pipeline import load_pipeline
from persres.evaluation.evaluate import Scorers
from persres.files import write_json
from persres.toyworld.experiment import (
    ToySettings,
    personalize,
    reference_photos,
    sample_variants,
    score_concept,
)
from persres.toyworld.judge import HEADS, Judge, load_judge, read_images
from persres.toyworld.prompts import concept_prompts
from persres.toyworld.quality import means
from persres.toyworld.scenes import HELD_OUT, SIZE, Scene, caption, random_scene


def base_quality(pipe: Any, judge: Judge, count: int, seed: int, held_out: bool) -> dict[str, float]:
    """Share of full captions whose every part the judge reads back from the base model's image."""
    rng = np.random.default_rng([seed, 21 if held_out else 20])
    scenes: list[Scene] = []
    for i in range(count):
        instance = HELD_OUT[i % len(HELD_OUT)] if held_out else None
        scenes.append(random_scene(rng, instance=instance))
    images = []
    backbone = backbone_of(pipe)  # the U-Net's classifier-free guidance, or Flux's (true CFG on the toy)
    for i, scene in enumerate(scenes):
        generator = torch.Generator().manual_seed(seed + i)
        out = pipe(
            **backbone.text_inputs(pipe, caption(scene)),
            **backbone.sampling_kwargs(pipe, 7.5),
            num_inference_steps=25,
            height=SIZE,
            width=SIZE,
            generator=generator,
            output_type="np",
        )
        images.append((out.images[0] * 255).round().astype(np.uint8))
    reads = read_images(judge, images)
    hits: dict[str, list[bool]] = {name: [] for name in HEADS}
    for scene, read in zip(scenes, reads, strict=True):
        for name in HEADS:
            if name == "colour" and scene.style == "sketch":
                continue
            hits[name].append(read[name] == (getattr(scene, name) or "none"))
    return {name: float(np.mean(v)) for name, v in hits.items()}


def concept_rows(
    base: str,
    pipe: Any,
    judge: Judge,
    scorers: Scorers,
    out: Path,
    index: int,
    rank: float | int,
    images: int,
) -> list[dict[str, Any]]:
    instance = HELD_OUT[index]
    name = f"{'-'.join(instance)}-rank{rank}"
    settings = ToySettings(rank=rank, images_per_prompt=images)
    photos = reference_photos(instance, out / "photos" / "-".join(instance), settings.photos)
    started = time.monotonic()
    residuals = personalize(base, instance, photos, out / "runs" / name, settings).residuals
    trained = time.monotonic() - started
    prompts = concept_prompts(instance, per_kind=2, offset=index)
    sampling = settings.sampling()
    variants = sample_variants(pipe, residuals, prompts, sampling)
    rows = score_concept(variants, prompts, sampling, judge, scorers, out / "images" / name, photos)
    for row in rows:
        row.update(concept=" ".join(instance), rank=str(rank), train_seconds=trained)
    print(f"  {name}: trained in {trained:.0f} s", file=sys.stderr)
    return rows


def main() -> None:
    parser = toy_parser(__doc__, "bench-output/toyworld")
    parser.add_argument("--ranks", nargs="+", type=ResidualConfig.parse_rank, default=[0.05])
    parser.add_argument("--sweep-concepts", type=int, default=0, help="concepts for ranks other than 0.05")
    parser.add_argument("--base-prompts", type=int, default=192)
    args = parse_fresh(parser)
    torch.manual_seed(0)
    pipe = load_pipeline(args.base, torch.float32, torch.device("cpu"))
    judge = load_judge(args.oracle)
    scorers = Scorers.load(str(args.oracle / "clip"), str(args.oracle / "dino"), device="cpu")
    pipe.set_progress_bar_config(disable=True)

    quality = {
        "training instances": base_quality(pipe, judge, args.base_prompts, 0, held_out=False),
        "held-out instances (in words)": base_quality(pipe, judge, args.base_prompts, 0, held_out=True),
    }
    print("## Base model: share of full captions read back right by the judge\n")
    print(md_table([{"captions": k, **v} for k, v in quality.items()], ("captions", *HEADS)))

    rows: list[dict[str, Any]] = []
    for rank in args.ranks:
        count = args.concepts if rank == 0.05 else (args.sweep_concepts or args.concepts)
        for index in range(count):
            rows.extend(concept_rows(args.base, pipe, judge, scorers, args.out, index, rank, args.images))
    write_json(args.out / "rows.json", rows, overwrite=False)
    write_json(args.out / "base_quality.json", quality, overwrite=False)

    metrics = ("identity", "text", "clip_t", "clip_i", "dino_i", "border_change")
    main_rank = [r for r in rows if r["rank"] == "0.05"]
    print("\n## Held-out concepts, rank 0.05: all prompts\n")
    print(md_table(means(main_rank, ("variant",)), ("variant", "n", *metrics)))
    print("\n## Per prompt kind\n")
    kinds = sorted(means(main_rank, ("category", "variant")), key=lambda r: (r["category"], r["variant"]))
    print(md_table(kinds, ("category", "variant", "n", *metrics)))
    print("\n## Rank sweep (personalized variants)\n")
    sweep = [r for r in means(rows, ("rank", "variant")) if r["variant"] != "base"]
    print(md_table(sweep, ("rank", "variant", "n", *metrics, "train_seconds")))
    print(json.dumps({"out": str(args.out), "rows": len(rows)}))


if __name__ == "__main__":
    main()
