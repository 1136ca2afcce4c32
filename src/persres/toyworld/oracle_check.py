"""How right the oracle is on real generator scenes it never saw (fresh seeds).

- judge: per head, the share of scenes read right.
- CLIP (through ``persres.evaluation.evaluate.Scorers``, the ``persres evaluate`` path): for each scene and
  each attribute (class, colour (not of sketches), pattern, background), is the true caption the
  best match among captions that differ only in that attribute?
- DINO: does each scene's nearest other scene (CLS cosine) show the same instance (class, colour,
  pattern)? Chance is about 1/250.

    python -m persres.toyworld.oracle_check --oracle models/toyworld-oracle
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from persres.evaluation.evaluate import Scorers
from persres.toyworld.backgrounds import BACKGROUNDS
from persres.toyworld.judge import load_judge
from persres.toyworld.scenes import CLASSES, COLOURS, PATTERNS, Scene, caption, random_scene, render
from persres.toyworld.train_oracle import Pool, judge_accuracy

SWAPS: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
}


def clip_accuracy(scorers: Scorers, scenes: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    embedded = scorers.clip_images(images)
    out = {}
    for name, options in SWAPS.items():
        hits = []
        for scene, image_embedding in zip(scenes, embedded, strict=True):
            if name == "colour" and scene.style == "sketch":
                continue  # sketches have no colour
            texts = [caption(replace(scene, **{name: option})) for option in options]  # type: ignore[arg-type]
            scores = scorers.clip_texts(texts) @ image_embedding
            hits.append(options[int(scores.argmax())] == getattr(scene, name))
        out[name] = float(np.mean(hits))
    return out


def dino_accuracy(scorers: Scorers, scenes: list[Scene], images: list[Image.Image]) -> float:
    embedded = scorers.dino_images(images)
    similarity = embedded @ embedded.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(1).tolist()
    return float(np.mean([scenes[j].instance == scenes[i].instance for i, j in enumerate(nearest)]))


def measure(oracle: Path, count: int = 1000, seed: int = 99) -> dict[str, object]:
    test = Pool.draw(seed, count)
    scorers = Scorers.load(str(oracle / "clip"), str(oracle / "dino"), device="cpu")
    images = [Image.fromarray(i) for i in test.images]
    # DINO's nearest neighbour needs several scenes of each instance: a gallery of 8 per instance.
    rng = np.random.default_rng([seed, 5])
    gallery = [random_scene(rng, instance=s.instance) for s in test.scenes[: count // 8] for _ in range(8)]
    with torch.no_grad():
        return {
            "scenes": count,
            "judge": judge_accuracy(load_judge(oracle), test),
            "clip_best_caption": clip_accuracy(scorers, test.scenes, images),
            "dino_nearest_same_instance": dino_accuracy(
                scorers, gallery, [Image.fromarray(render(s)[0]) for s in gallery]
            ),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the toy world's oracle on fresh scenes.")
    parser.add_argument("--oracle", type=Path, default=Path("models/toyworld-oracle"))
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.oracle, args.count), indent=2))


if __name__ == "__main__":
    main()
