"""Class images for prior preservation: "a photo of a {class}" drawn by the base model, cached on disk.

DreamBooth (Ruiz et al., CVPR 2023) and Custom Diffusion (Kumari et al., CVPR 2023) add a loss on
images of the concept's class so that fine-tuning does not make every "dog" the user's dog. DreamBooth
draws them with the base model (diffusers' train_dreambooth.py, ``--num_class_images``); Custom
Diffusion retrieved real ones from LAION in its paper, and here is given generated ones as well.

Image i is drawn with DDIM from a CPU generator seeded ``seed + i`` and saved as ``NNNN.png``, each
written atomically (a killed draw leaves complete images and no partial one). The folder lives under
``$PERSRES_CACHE/prior/<key>/`` (default ``~/.cache/persres``), where the key digests: the base model's
weight files, the class prompt, the resolution, the seed and the sampler settings. Asking again for as
many or fewer images draws nothing; asking for more draws only the missing ones (top-up).

The base model is fingerprinted by the files that decide the images (U-Net, text encoder, tokenizer,
VAE, scheduler: name, size, modification time) and the folder's resolved path, not by hashing its
weights: a hit then loads no model at all, where hashing Stable Diffusion's 4 GB would cost seconds on
every run. A hub id resolves to its snapshot folder in the hub cache, named by the commit. Editing
weights in place changes their mtime and so the key; a copied folder gets a new key (a redraw, never a
stale reuse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from persres.backbones import default_guidance_for_base
from persres.config import MAX_PRIOR_IMAGES, SampleSettings, TrainConfig
from persres.core.pipeline import load_pipeline, looks_like_path
from persres.errors import ConfigError, ModelError, quote
from persres.files import atomic_path, cache_folder, write_json
from persres.methods.catalog import METHODS
from persres.training.checkpoint import Processes
from persres.training.data import ConceptImages, list_images

log = logging.getLogger(__name__)

PRIOR_SAMPLING = SampleSettings(steps=50, guidance=7.5)  # diffusers' StableDiffusionPipeline defaults
KEY_FILE = ".persres-prior.json"  # hidden: list_images skips it
FINGERPRINTED = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
SAMPLER = "DDIM (clip_sample=False, eta=0)"


def class_prompt(class_word: str) -> str:
    return f"a photo of a {class_word}"


def class_images(
    base: str,
    class_word: str,
    count: int,
    resolution: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: SampleSettings = PRIOR_SAMPLING,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """The folder holding at least ``count`` class images (``0000.png`` ...); draws only what is missing.

    The folder may hold more than ``count`` from an earlier, larger request: read the first ``count``
    with ``read_class_images``. ``settings.guidance`` None: the base family's (``default_guidance``)."""
    if not 1 <= count <= MAX_PRIOR_IMAGES:
        raise ConfigError(f"prior images must be in [1, {MAX_PRIOR_IMAGES:,}] to draw them, got {count:,}")
    settings = settings.with_guidance(default_guidance_for_base(base))  # the key holds a number
    key = {
        "base": fingerprint(base),
        "prompt": class_prompt(class_word),
        "resolution": resolution,
        "seed": seed,
        "sampler": SAMPLER,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "dtype": str(dtype),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else cache_folder() / "prior"
    folder = folder / digest
    missing = [i for i in range(count) if not image_path(folder, i).is_file()]
    if not missing:
        return folder
    write_json(folder / KEY_FILE, {**key, "base_model": base})  # what the folder holds, for a reader
    prompt = class_prompt(class_word)
    log.info("drawing %d class images of %s into %s", len(missing), quote(prompt), folder)
    # the bar shows at once, before the base model loads: the first image may be a minute away
    with tqdm(total=len(missing), desc=f"class images of {quote(prompt)}", disable=not progress) as bar:
        pipe = load_pipeline(base, dtype=dtype, device=device)
        for i in missing:
            draw(pipe, prompt, seed + i, resolution, settings, image_path(folder, i))
            bar.update()
    return folder


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:04d}.png"


@torch.no_grad()
def draw(
    pipe: StableDiffusionPipeline,
    prompt: str,
    seed: int,
    resolution: int,
    settings: SampleSettings,
    path: Path,
) -> None:
    """One class image, written atomically to ``path``."""
    generator = torch.Generator().manual_seed(seed)  # CPU noise: the same image on any device
    image = pipe(
        prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=resolution,
        width=resolution,
        generator=generator,
    ).images[0]
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_class_images(folder: str | os.PathLike[str], count: int, resolution: int) -> ConceptImages:
    """The first ``count`` class images of a ``class_images`` folder, ready to crop like the photos."""
    paths = [p for p in list_images(folder, limit=None) if p.stem.isdecimal()][:count]
    if len(paths) < count:
        raise ConfigError(f"{folder} holds {len(paths)} class images, {count} asked; call class_images first")
    return ConceptImages.from_paths(paths, resolution)


def fingerprint(base: str) -> str:
    """The base model's resolved folder and the name, size and mtime of the files that decide images."""
    folder = resolve_folder(base)
    digest = hashlib.sha256(str(folder).encode())
    files = [p for sub in FINGERPRINTED for p in sorted((folder / sub).rglob("*")) if p.is_file()]
    for file in [folder / "model_index.json", *files]:
        stat = file.stat()  # follows the hub cache's symlinks to the blobs
        digest.update(f"{file.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def resolve_folder(base: str) -> Path:
    if looks_like_path(base):
        folder = Path(base).expanduser().resolve()
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"`base` {base} is not a diffusers pipeline folder (no model_index.json)")
        return folder
    from huggingface_hub import snapshot_download

    try:  # only the index: the snapshot folder's name is the commit, which pins every weight
        return Path(snapshot_download(base, allow_patterns=["model_index.json"]))
    except Exception as exc:  # the hub's errors have no common base; the message says what went wrong
        raise ModelError(
            f"cannot find base model {quote(base)} ({type(exc).__name__}): download it once with network, "
            "or pass a local diffusers folder"
        ) from None


def prior_images(
    config: TrainConfig, processes: Processes, device: torch.device, progress: bool
) -> ConceptImages | None:
    """The class images of prior preservation (``config.prior_images`` of them, drawn by the base model
    once and cached across runs; the main process draws, the others read), or None."""
    if config.prior_images == 0 or not METHODS[config.method].takes_prior_images:
        return None
    if processes.is_main:
        class_images(config.base, config.class_word, config.prior_images, config.resolution, config.seed,
                     device=device, progress=progress)  # fmt: skip
    processes.barrier()
    folder = class_images(config.base, config.class_word, config.prior_images, config.resolution, config.seed,
                          device=device, progress=False)  # fmt: skip
    return read_class_images(folder, config.prior_images, config.resolution)
