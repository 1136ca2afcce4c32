"""Sampling with personalized residuals (normal sampling: the residuals apply everywhere).

Image j of every prompt is drawn from seed ``seed + j`` with a CPU generator, so the same seed gives
the same image on any run, and different prompts with the same seed start from the same noise.
The literal ``V*`` in a prompt stands for the concept's identifier token.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from persres.errors import ConfigError
from persres.files import atomic_path, write_json

log = logging.getLogger(__name__)

PLACEHOLDER = "V*"


@dataclass(frozen=True)
class SampleSettings:
    """DDIM sampling settings; ``height``/``width`` None means the model's native size."""

    steps: int = 50
    guidance: float = 7.5
    num_images: int = 1
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1, got {self.num_images}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"--{name} {value} must be a positive multiple of 8")


@dataclass
class Sample:
    prompt: str  # as given, with V*
    expanded: str  # as fed to the text encoder
    seed: int
    image: Image.Image


def expand_prompt(prompt: str, token: str) -> str:
    """Replace the literal V* by the identifier token."""
    if PLACEHOLDER not in prompt:
        log.warning("prompt %r has no %s: the concept's identifier is not in it", prompt, PLACEHOLDER)
    return prompt.replace(PLACEHOLDER, token)


def sample(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    token: str,
    settings: SampleSettings = SampleSettings(),
    progress: bool = True,
) -> list[Sample]:
    """Generate ``settings.num_images`` images per prompt with whatever residuals ``pipe.unet`` holds."""
    if not prompts:
        raise ConfigError("no prompt given; pass at least one --prompt")
    samples = []
    total = len(prompts) * settings.num_images
    with tqdm(total=total, desc="sampling", disable=not progress) as bar:
        for prompt in prompts:
            expanded = expand_prompt(prompt, token)
            for j in range(settings.num_images):
                seed = settings.seed + j
                image = generate(pipe, expanded, seed, settings)
                samples.append(Sample(prompt, expanded, seed, image))
                bar.update()
    return samples


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt: str, seed: int, settings: SampleSettings) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.height,
        width=settings.width,
        generator=generator,
        output_type="pil",
    )
    return result.images[0]


def next_free_index(out: Path) -> int:
    """Numbering continues after the images already in ``out``: nothing is overwritten."""
    taken = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(taken, default=-1) + 1


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def write_samples(
    out: str | os.PathLike[str], samples: list[Sample], settings: SampleSettings, extra: dict[str, Any]
) -> list[Path]:
    """One PNG and one JSON sidecar (prompt, seed, settings) per image; returns the PNG paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = next_free_index(out)
    written = []
    for offset, item in enumerate(samples):
        stem = f"{start + offset:04d}-{slug(item.prompt)}"
        with atomic_path(out / f"{stem}.png", overwrite=False) as tmp:
            item.image.save(tmp, format="PNG")
        sidecar = {"prompt": item.prompt, "expanded_prompt": item.expanded, **asdict(settings), **extra}
        sidecar.update(
            seed=item.seed,
            num_images=1,
            image=f"{stem}.png",
            height=item.image.height,
            width=item.image.width,
        )
        write_json(out / f"{stem}.json", sidecar, overwrite=False)
        written.append(out / f"{stem}.png")
    return written
