"""Train the toy world's oracle scorers on generator scenes and measure them on fresh ones.

    python -m persres.toyworld.train_oracle --out models/toyworld-oracle

Three models, all saved as safetensors: the judge (direct labels, ``judge.py``); a CLIP-style model
(``clip/``: text and vision towers trained contrastively on scenes and their captions) and a
DINO-style ViT (``dino/``: a ``ViTModel`` whose CLS token was trained to tell instances apart), both
loaded by ``persres evaluate --clip/--dino`` exactly like the real scorers, through the same
preprocessing (``persres.evaluation.evaluate.preprocess``). Held-out instances are never shown to any of them.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from persres.evaluation.evaluate import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess
from persres.files import write_json
from persres.testing.tiny import word_tokenizer
from persres.toyworld.judge import HEADS, IGNORE, Judge, labels_of, read_images, save_judge, to_tensor
from persres.toyworld.scenes import (
    CLASSES,
    COLOURS,
    PATTERNS,
    Scene,
    caption,
    random_scene,
    render,
    vocabulary,
)

log = logging.getLogger(__name__)
INSTANCES = [(c, k, p) for c in CLASSES for k in COLOURS for p in PATTERNS]


@dataclass
class Pool:
    scenes: list[Scene]
    images: list[np.ndarray]

    @classmethod
    def draw(cls, seed: int, size: int) -> Pool:
        rng = np.random.default_rng([seed, 7])
        scenes = [random_scene(rng) for _ in range(size)]
        return cls(scenes, [render(s)[0] for s in scenes])

    def batch(self, rng: np.random.Generator, size: int) -> tuple[list[Scene], list[np.ndarray]]:
        picks = rng.integers(0, len(self.scenes), size)
        return [self.scenes[i] for i in picks], [self.images[i] for i in picks]


def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, what: str, step: int, steps: int) -> None:
    """One optimizer step on ``loss``, logged every 100 steps."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if (step + 1) % 100 == 0:
        log.info("%s step %d/%d loss %.4f", what, step + 1, steps, loss.item())


def train_judge(pool: Pool, steps: int, seed: int) -> Judge:
    torch.manual_seed(seed)
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng([seed, 1])
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    for step in range(steps):
        _cosine_lr(optimizer, 2e-3, step, steps)
        scenes, images = pool.batch(rng, 64)
        logits, labels = judge(to_tensor(images)), labels_of(scenes)
        loss = sum(loss_fn(logits[name], labels[name]) for name in HEADS)
        _update(optimizer, loss, "judge", step, steps)  # type: ignore[arg-type]
    return judge.eval().requires_grad_(False)


def judge_accuracy(judge: Judge, test: Pool) -> dict[str, float]:
    read = read_images(judge, test.images)
    accuracy = {}
    for name in HEADS:
        pairs = [
            (r[name], getattr(s, name) or "none")
            for r, s in zip(read, test.scenes, strict=True)
            if not (name == "colour" and s.style == "sketch")
        ]
        accuracy[name] = sum(a == b for a, b in pairs) / len(pairs)
    return accuracy


def _pil(images: list[np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(i) for i in images]


def clip_config(tokenizer_size: int, ids: dict[str, int]) -> CLIPConfig:
    text = {
        "vocab_size": tokenizer_size,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "projection_dim": 64,
        **ids,
    }
    vision = {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 28,
        "projection_dim": 64,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def train_clip(pool: Pool, steps: int, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(vocabulary(), max_length=32)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        "eos_token_id": end,
        "pad_token_id": end,
    }
    model = CLIPModel(clip_config(len(tokenizer), ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng([seed, 2])
    for step in range(steps):
        _cosine_lr(optimizer, 1e-3, step, steps)
        scenes, images = pool.batch(rng, 128)
        texts = [caption(s, rng) for s in scenes]
        tokens = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        pixels = preprocess(_pil(images), 224, 224, CLIP_MEAN, CLIP_STD)
        output = model(input_ids=tokens.input_ids, pixel_values=pixels)
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)  # captions repeat in a batch: every match is right
        logits = output.logits_per_image
        loss = (
            -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()
        )
        _update(optimizer, loss, "clip", step, steps)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def dino_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=28,
    )


def train_dino(pool: Pool, steps: int, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    model = ViTModel(dino_config(), add_pooling_layer=False)
    head = nn.Linear(96, len(INSTANCES))
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng([seed, 3])
    for step in range(steps):
        _cosine_lr(optimizer, 1e-3, step, steps)
        scenes, images = pool.batch(rng, 128)
        pixels = preprocess(_pil(images), 256, 224, IMAGENET_MEAN, IMAGENET_STD)
        cls_token = model(pixel_values=pixels).last_hidden_state[:, 0]
        labels = torch.tensor([INSTANCES.index(s.instance) for s in scenes])
        loss = nn.functional.cross_entropy(head(cls_token), labels)
        _update(optimizer, loss, "dino", step, steps)
    model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's oracle scorers.")
    parser.add_argument("--out", type=Path, default=Path("models/toyworld-oracle"))
    parser.add_argument("--pool", type=int, default=10000, help="training scenes rendered once")
    parser.add_argument("--judge-steps", type=int, default=1200)
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--dino-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    pool, test = Pool.draw(args.seed, args.pool), Pool.draw(args.seed + 1, 2000)
    judge = train_judge(pool, args.judge_steps, args.seed)
    accuracy = judge_accuracy(judge, test)
    log.info("judge accuracy on fresh scenes: %s", accuracy)
    args.out.mkdir(parents=True)
    save_judge(judge, args.out, accuracy)
    train_clip(pool, args.clip_steps, args.seed, args.out / "clip")
    train_dino(pool, args.dino_steps, args.seed, args.out / "dino")
    write_json(args.out / "training.json", vars(args) | {"out": str(args.out)})
    from persres.toyworld.oracle_check import measure  # imports this module: not at the top

    write_json(args.out / "accuracy.json", measure(args.out))


if __name__ == "__main__":
    main()
