"""CLIP and DINO scores with CustomConcept101 semantics, stated exactly.

- ``clip_t`` (text alignment): 2.5 * max(cos, 0) between the CLIP image embedding and the CLIP text
  embedding of the prompt with the identifier removed ("a V* dog on the beach" -> "a dog on the
  beach"), per image, then averaged.
- ``clip_i`` (image alignment): cosine between CLIP image embeddings of a generated image and of each
  reference image; per image the mean over references, overall the mean over all pairs.
- ``dino_i``: the same all-pairs mean with the DINO ViT-S/16 CLS token.

Preprocessing (done here, not by a model folder's processor config, so it cannot drift):
CLIP: shorter side to 224 (bicubic), center crop 224, CLIP mean/std. DINO: shorter side to 256
(bicubic), center crop 224, ImageNet mean/std. Images are converted to RGB first. Output sizes and
crop offsets are computed as torchvision's ``Resize(int)`` and ``CenterCrop`` do, and the resampling is
PIL's bicubic filter, which torchvision also uses for PIL inputs: the reference pipelines' numbers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection, ViTModel

from persres import readback
from persres.config import DEFAULT_CLIP, DEFAULT_DINO
from persres.core.pipeline import resolve_device
from persres.core.tokens import text_length
from persres.errors import ConfigError, InputError, ModelError
from persres.evaluation.results import METRICS
from persres.images import load_rgb
from persres.quiet import warnings_hidden

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEXT_SCALE = 2.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NOT_SAMPLES = re.compile(r"-(both|masks(-V\d+)?)\.png$")  # grids and mask strips written beside samples
IDENTIFIERS = re.compile(r"V\d*\*|<new\d+>")


def strip_identifier(prompt: str, token: str | None = None) -> str:
    """The prompt without its identifier: placeholders (V*, V1*, <new1>) and the token word."""
    text = IDENTIFIERS.sub(" ", prompt)
    if token:
        text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def preprocess(images: list[Image.Image], resize: int, crop: int, mean: tuple, std: tuple) -> torch.Tensor:
    """(N, 3, crop, crop): shorter side to ``resize`` (bicubic), center crop, normalise.

    Sizes and offsets follow torchvision's ``Resize(int)`` and ``CenterCrop`` exactly: the longer side
    is truncated (``int(resize * long / short)``), the crop offset rounded."""
    batch = []
    for image in images:
        image = image.convert("RGB")
        short, long = sorted(image.size)
        other = int(resize * long / short)
        size = (resize, other) if image.width <= image.height else (other, resize)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = int(round((image.width - crop) / 2.0)), int(round((image.height - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        batch.append((array - np.array(mean, np.float32)) / np.array(std, np.float32))
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def complete(cls: Any, name: str, setting: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` that refuses a checkpoint of another architecture (transformers would
    fill the missing weights at random and only log a warning)."""
    # transformers' load report lists every weight of the other CLIP tower as unexpected, which is how
    # such a checkpoint is meant to be read; weights that are *missing* are checked just below
    with warnings_hidden("transformers"):
        model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        raise ModelError(
            f"`{setting}` {name} is not a {cls.__name__.removesuffix('WithProjection')} checkpoint: "
            f"{len(info['missing_keys'])} weights missing (e.g. {sorted(info['missing_keys'])[0]})"
        )
    return model


@dataclass
class Scorers:
    """CLIP (text and image towers with projection) and DINO, frozen, on one device."""

    clip_text: CLIPTextModelWithProjection
    clip_vision: CLIPVisionModelWithProjection
    tokenizer: CLIPTokenizer
    dino: ViTModel | None  # None when only CLIP is needed (macro-class suggestions)
    device: torch.device
    names: tuple[str, str] = (DEFAULT_CLIP, DEFAULT_DINO)
    batch_size: int = 16

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO, device: str = "auto") -> Scorers:
        target = resolve_device(device)
        try:
            text = complete(CLIPTextModelWithProjection, clip, "clip")
            vision = complete(CLIPVisionModelWithProjection, clip, "clip")
            tokenizer = CLIPTokenizer.from_pretrained(clip)
            dino_model = complete(ViTModel, dino, "dino", add_pooling_layer=False) if dino else None
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"cannot load the scoring models (`clip` {clip}, `dino` {dino}): {first}. Pass local "
                "folders or make sure the hub ids are cached (HF_HUB_OFFLINE=1 forbids downloads)"
            ) from None
        text, vision = (m.to(target).eval().requires_grad_(False) for m in (text, vision))
        if dino_model is not None:
            dino_model = dino_model.to(target).eval().requires_grad_(False)
        return cls(text, vision, tokenizer, dino_model, target, (clip, dino or ""))

    @torch.no_grad()
    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm CLIP image embeddings."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess(images[start : start + self.batch_size], 224, 224, CLIP_MEAN, CLIP_STD)
            out.append(self.clip_vision(pixel_values=pixels.to(self.device)).image_embeds.float())
        return unit(torch.cat(out))

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit-norm CLIP text embeddings (truncated to CLIP's 77 tokens)."""
        out = []
        length = text_length(self.tokenizer, self.clip_text.config)
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size],
                padding="max_length",
                max_length=length,
                truncation=True,
                return_tensors="pt",
            )
            out.append(self.clip_text(input_ids=tokens.input_ids.to(self.device)).text_embeds.float())
        return unit(torch.cat(out))

    @torch.no_grad()
    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm DINO CLS embeddings."""
        if self.dino is None:
            raise ConfigError("these scorers were loaded without a DINO model")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess(
                images[start : start + self.batch_size], 256, 224, IMAGENET_MEAN, IMAGENET_STD
            )
            hidden = self.dino(pixel_values=pixels.to(self.device)).last_hidden_state  # (N, 1 + patches, D)
            out.append(hidden[:, 0].float())
        return unit(torch.cat(out))


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per image 2.5 * max(cos, 0); rows of both are unit-norm and paired."""
    return TEXT_SCALE * (images * texts).sum(-1).clamp(min=0)


def pairwise_alignment(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image the mean cosine to every reference; their mean is the all-pairs mean."""
    return (generated @ references.T).mean(dim=1)


def image_files(folder: str | os.PathLike[str], what: str) -> list[Path]:
    """Image files of a folder, without persres' grids and mask strips."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} not found")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not NOT_SAMPLES.search(p.name)
    )
    if not files:
        raise InputError(f"{what} folder {folder} holds no images")
    return files


SIDECAR_FIELDS = {"prompt": str, "token": str, "sampler": str, "seed": int, "concepts": list}


def read_sidecar(path: Path, required: tuple[str, ...] = ("prompt",)) -> dict[str, Any]:
    """A sample's JSON sidecar, checked to hold the ``required`` fields, and every field that is read
    (prompt, token, sampler, seed, concepts and their tokens) to be of the right type."""
    fix = "fix it, or delete it (then pass `prompt` to score the image)"
    try:
        data = readback.load_file(path)
    except ValueError as exc:
        raise InputError(f"sidecar {path} is damaged ({exc}); {fix}") from None
    except OSError as exc:
        raise InputError(f"sidecar {path} cannot be read ({exc.strerror or exc}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"sidecar {path} is not a JSON object; persres sample writes {{'prompt': ...}}")
    for key in required:
        if data.get(key) is None:
            raise InputError(f"sidecar {path} has no {key}; persres sample writes {{'{key}': ...}}; {fix}")
    for key, kind in SIDECAR_FIELDS.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InputError(f"sidecar {path}: {key!r} must be {kind.__name__}; {fix}")
    for concept in data.get("concepts") or []:
        if not isinstance(concept, dict) or not isinstance(concept.get("token", ""), str | None):
            raise InputError(f"sidecar {path}: 'concepts' must be objects whose 'token' is text; {fix}")
    return data


def prompts_for(files: list[Path], prompt: str | None, token: str | None) -> list[str]:
    """Each image's scoring text: its sidecar's prompt, else ``prompt``; identifier removed."""
    texts = []
    for path in files:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            data = read_sidecar(sidecar)
            text, token_here = data["prompt"], token or data.get("token")
            tokens = [c.get("token") for c in data.get("concepts") or []] + [token_here]
        elif prompt is not None:
            text, tokens = prompt, [token]
        else:
            raise ConfigError(
                f"{path.name} has no JSON sidecar; pass `prompt` (and `token`) to score text alignment"
            )
        for word in tokens:
            text = strip_identifier(text, word)
        texts.append(strip_identifier(text))
    return texts


def evaluate_images(
    scorers: Scorers, generated: list[Path], references: list[Path], texts: list[str]
) -> dict[str, Any]:
    """Per-image and mean clip_t, clip_i, dino_i for generated images against references."""
    images = [load_rgb(p) for p in generated]
    refs = [load_rgb(p) for p in references]
    clip_gen = scorers.clip_images(images)
    clip_t = text_alignment(clip_gen, scorers.clip_texts(texts))
    clip_i = pairwise_alignment(clip_gen, scorers.clip_images(refs))
    dino_i = pairwise_alignment(scorers.dino_images(images), scorers.dino_images(refs))
    per_image = [
        {"image": p.name, "text": t, "clip_t": float(a), "clip_i": float(b), "dino_i": float(c)}
        for p, t, a, b, c in zip(generated, texts, clip_t, clip_i, dino_i, strict=True)
    ]
    means = {key: float(torch.stack([torch.tensor(r[key]) for r in per_image]).mean()) for key in METRICS}
    models = {"clip_model": scorers.names[0], "dino_model": scorers.names[1]}
    return {**means, **models, "num_images": len(per_image), "num_references": len(refs), "images": per_image}


def evaluate_folder(
    images: str | os.PathLike[str],
    references: str | os.PathLike[str],
    prompt: str | None = None,
    token: str | None = None,
    scorers: Scorers | None = None,
) -> dict[str, Any]:
    """``persres evaluate``: score a folder of generated images against a folder of references."""
    generated = image_files(images, "generated image")
    refs = image_files(references, "reference image")
    texts = prompts_for(generated, prompt, token)
    result = evaluate_images(scorers or Scorers.load(), generated, refs, texts)
    return {"images_dir": str(images), "references_dir": str(references), **result}
