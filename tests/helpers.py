"""Helpers for tests on tiny U-Nets."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from persres.config import TrainConfig
from persres.core.residuals import find_residuals
from persres.evaluation.results import merge_results
from persres.files import write_json
from persres.formats.io import read_residual_file


def unet_inputs(
    unet: torch.nn.Module, batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([10, 500][:batch]), text


def randomize_residuals(unet: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Non-zero factors, so identity and merge checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in find_residuals(unet).values():
            wrapper.A.copy_(torch.randn(wrapper.A.shape, generator=g) * std)
            wrapper.B.copy_(torch.randn(wrapper.B.shape, generator=g) * std)


def run_unet(unet: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        latents, steps, text = inputs
        return unet(latents, steps, encoder_hidden_states=text).sample


def drop_model_max_length(tokenizer_folder: Path) -> Path:
    """Remove ``model_max_length`` from a saved tokenizer's config, as transformers 5 saves a
    CLIPProcessor: the tokenizer then reads it as 1e30."""
    path = tokenizer_folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    assert config.pop("model_max_length") is not None
    path.write_text(json.dumps(config))
    return tokenizer_folder


def tiny_config(base: Path, photos: Path, **changes: object) -> TrainConfig:
    """A training run on a tiny model that takes about a second."""
    config = TrainConfig(
        base=str(base),
        images=str(photos),
        class_word="dog",
        steps=6,
        batch_size=2,
        resolution=16,
        checkpoint_every=2,
        lr=1e-2,
    )
    return replace(config, **changes)


def interrupt_at(stop: int) -> Callable[[int, float], None]:
    """A training callback that stops the run with Ctrl-C at step ``stop``, as a user would."""

    def callback(step: int, loss: float) -> None:
        if step == stop:
            raise KeyboardInterrupt

    return callback


def interrupted_and_resumed(config: TrainConfig, out: Path, stop: int) -> Path:
    """Train ``config`` into ``out``, stopped by Ctrl-C at step ``stop``, then resumed to the end; the
    resumed run's result file."""
    from persres.training.train import train

    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=False, callback=interrupt_at(stop))
    return train(config, out, resume=True, progress=False).residuals


def assert_same_factors(got: Path, expected: Path) -> None:
    """Two residual files hold the same tensors, within 1e-6."""
    mine, theirs = read_residual_file(got).tensors, read_residual_file(expected).tensors
    assert mine.keys() == theirs.keys() and mine
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0)


def train_argv(base: Path, photos: Path, out: Path, *flags: str) -> list[str]:
    """``persres train`` on a tiny model, 2 steps; later flags override earlier ones."""
    return ["train", "--base", str(base), "--images", str(photos), "--out", str(out), "--class-word", "dog",
            "--steps", "2", "--batch-size", "1", "--resolution", "16", "--device", "cpu", *flags]  # fmt: skip


def diffusers_image(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    """What a user of plain diffusers gets: persres' sampler settings (DDIM without clipping, 2 steps,
    guidance 7.5), seed 0 drawn on the CPU."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, generator=generator).images[0]
    return np.asarray(image, dtype=np.int16)


CONCEPTS = {"pet_dog": "dog", "toy_cup": "cup"}  # the benchmark tests' dataset: folder -> class word


def make_dataset(root: Path) -> Path:
    """A CustomConcept101-format dataset of two concepts (random 20 px photos, two prompts each)."""
    entries = []
    rng = np.random.default_rng(0)
    for name, class_word in CONCEPTS.items():
        folder = root / "benchmark_dataset" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (root / "prompts").mkdir(exist_ok=True)
        (root / "prompts" / f"{class_word}.txt").write_text("a photo of {}\n{} on the beach\n")
        entries.append(
            {
                "instance_prompt": f"photo of a <new1> {class_word}",
                "class_prompt": class_word,
                "instance_data_dir": f"./benchmark_dataset/{name}",
                "class_data_dir": "./unused",
                "prompt_filename": f"prompts/{class_word}.txt",
            }
        )
    (root / "dataset.json").write_text(json.dumps(entries))
    return root


def finished_benchmark(root: Path) -> Path:
    """A benchmark folder as persres writes it, with one finished variant (two sampled images)."""
    out, references = root / "bench", root / "references"
    folder = out / "runs" / "pet_dog" / "rank-0.05"
    (folder / "samples").mkdir(parents=True)
    references.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(references / "ref.png")
    scores = {"clip_t": 0.5, "clip_i": 0.6, "dino_i": 0.7}
    images = []
    for sampler in ("normal", "lag"):
        name = f"0000-a-photo-of-v-dog-{sampler}.png"
        Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "samples" / name)
        images.append({"image": name, "sampler": sampler, "prompt_category": "identity", **scores})
    rows = [
        {"concept": "pet_dog", "category": "pet", "class_word": "dog", "rank": 0.05, "sampler": s, **scores}
        for s in ("normal", "lag")
    ]
    config = {"images": str(references), "class_word": "dog"}
    write_json(folder / "result.json", {"rows": rows, "images": images, "train_config": config})
    merge_results(out)
    return out


def bench_argv(dataset: Path, base: Path, out: Path, scorers: tuple[str, str]) -> list[str]:
    return [
        "benchmark",
        "--dataset",
        str(dataset),
        "--base",
        str(base),
        "--out",
        str(out),
        *("--steps", "2", "--batch-size", "1", "--resolution", "16", "--images-per-prompt", "1"),
        *("--sample-steps", "2", "--height", "16", "--width", "16", "--device", "cpu"),
        *("--clip", scorers[0], "--dino", scorers[1]),
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
