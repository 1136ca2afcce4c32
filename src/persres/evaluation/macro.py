"""Choosing the macro class: WordNet nouns ranked by CLIP against the concept's photos.

Paper (supplement, Table 4): the WordNet noun nearest (CLIP cosine) to the mean CLIP image embedding
of the reference images, used as the class word, raises image alignment and lowers text alignment.
``nearest`` is that rule. ``balanced`` is ours: among the nouns within ``margin`` of the best cosine
(at most ``CANDIDATES`` of them), take the most general one - the smallest WordNet depth of its first
sense, then the most frequent in SemCor, then the best cosine. Why: the nearest noun is often a very
specific one ("beagle", "teapot" for a mug) which binds appearance but makes prompts less editable;
a more general noun that is almost as close keeps more of the prompt's meaning. The benchmark's
``--class-source`` compares dataset / nearest / balanced in the layout of Table 4.

The noun table ships with persres (``assets/wordnet_nouns.tsv.gz``, 117,798 WordNet 3.0 noun lemmas,
built by ``scripts/build_wordnet.py``; licence in ``assets/WORDNET_LICENSE.txt``). Text embeddings of the
nouns are cached per CLIP model (keyed by a fingerprint of its text weights and of its tokenizer) as
safetensors; a cache file that is damaged in any way is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from persres.errors import ConfigError, quote
from persres.evaluation.evaluate import Scorers, image_files, unit
from persres.files import atomic_path, cache_folder
from persres.images import load_rgb
from persres.words import Noun, load_nouns

log = logging.getLogger(__name__)

Strategy = Literal["nearest", "balanced"]
TEMPLATE = "a photo of a {}."
CANDIDATES = 20
DEFAULT_MARGIN = 0.01
BATCH = 256


@dataclass(frozen=True)
class Suggestion:
    noun: str
    score: float
    depth: int
    tagged: int


def model_fingerprint(scorers: Scorers) -> str:
    """Identifies the CLIP text tower by its weights (a renamed copy hits the same cache)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(scorers.clip_text.state_dict().items()):  # every weight of the text tower
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identifies a tokenizer by what decides the token ids of a text: its vocabulary, merges,
    normalisation and special tokens (the serialized tokenizer) and its length limit. The padding and
    truncation state is left out: the tokenizers library stores there how it was last called."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    described = json.dumps([spec, tokenizer.model_max_length], sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def noun_embeddings(
    scorers: Scorers,
    nouns: list[str],
    template: str = TEMPLATE,
    cache: Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) unit-norm text embeddings of ``template`` filled with each noun; cached on disk, keyed by
    the text tower's weights, the tokenizer, the template and the nouns."""
    fingerprints = [model_fingerprint(scorers), tokenizer_fingerprint(scorers.tokenizer)]
    key = hashlib.sha256("\n".join([*fingerprints, template, *nouns]).encode()).hexdigest()[:24]
    path = (cache or cache_folder()) / "nouns" / f"{key}.safetensors"
    cached = read_cache(path, len(nouns), scorers.clip_text.config.projection_dim)
    if cached is not None:
        log.info("noun embeddings from cache %s", path)
        return cached
    chunks = []
    for start in tqdm(
        range(0, len(nouns), BATCH), desc="embedding nouns (cached after this)", disable=not progress
    ):
        chunks.append(scorers.clip_texts([template.format(n) for n in nouns[start : start + BATCH]]).cpu())
    embeddings = torch.cat(chunks)
    try:
        with atomic_path(path) as tmp:
            save_file(
                {"embeddings": embeddings.contiguous()},
                str(tmp),
                metadata={"clip": scorers.names[0], "template": template, "count": str(len(nouns))},
            )
    except OSError as exc:  # a cache is a convenience: a read-only home must not stop the command
        log.warning(
            "cannot write the noun embedding cache %s (%s); set PERSRES_CACHE to a writable folder", path, exc
        )
    return embeddings


def read_cache(path: Path, count: int, width: int) -> torch.Tensor | None:
    """The cached (count, width) embeddings, or None when there are none; a damaged cache file (not
    safetensors, another shape or dtype, not finite, not unit-norm) is logged and recomputed."""
    if not path.exists():
        return None
    problem: str | None
    try:
        cached = load_file(str(path))["embeddings"]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
        problem = "not a safetensors file holding 'embeddings'"
    else:
        problem = embedding_problem(cached, count, width)
    if problem is None:
        return cached
    log.warning("noun embedding cache %s is damaged (%s); recomputing it", path, problem)
    return None


def embedding_problem(cached: torch.Tensor, count: int, width: int) -> str | None:
    if cached.dtype != torch.float32:
        return f"dtype {cached.dtype}, expected float32"
    if tuple(cached.shape) != (count, width):
        return f"shape {tuple(cached.shape)}, expected {(count, width)}"
    if not torch.isfinite(cached).all():
        return "values that are not finite"
    if not torch.allclose(cached.norm(dim=-1), torch.ones(count), atol=1e-3):
        return "rows that are not unit-norm"
    return None


def image_embedding(scorers: Scorers, folder: str | os.PathLike[str]) -> torch.Tensor:
    """(D,) unit-norm mean of the unit-norm CLIP embeddings of the folder's images."""
    images = [load_rgb(p) for p in image_files(folder, "concept image")]
    return unit(scorers.clip_images(images).mean(dim=0)).cpu()


def rank_nouns(
    image: torch.Tensor, embeddings: torch.Tensor, nouns: list[Noun], top: int
) -> list[Suggestion]:
    """The ``top`` nouns by cosine with the image embedding, best first."""
    scores = embeddings @ image  # (N,)
    best = torch.topk(scores, min(top, len(nouns)))
    return [
        Suggestion(nouns[i].lemma, float(s), nouns[i].depth, nouns[i].tagged)
        for s, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
    ]


def choose(ranked: list[Suggestion], strategy: Strategy, margin: float = DEFAULT_MARGIN) -> Suggestion:
    """``nearest``: the best cosine. ``balanced``: the most general noun within ``margin`` of it."""
    if strategy == "nearest":
        return ranked[0]
    if strategy != "balanced":
        raise ConfigError(f"`strategy` {quote(strategy)} is not nearest or balanced")
    close = [s for s in ranked[:CANDIDATES] if s.score >= ranked[0].score - margin]
    known = [s for s in close if s.depth >= 0] or close
    return min(known, key=lambda s: (s.depth, -s.tagged, -s.score))


def suggest_classes(
    scorers: Scorers,
    images: str | os.PathLike[str],
    top: int = 10,
    strategy: Strategy = "nearest",
    margin: float = DEFAULT_MARGIN,
    nouns: list[Noun] | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> list[Suggestion]:
    """Ranked suggestions; the strategy's choice comes first, then the rest by cosine."""
    if top < 1:
        raise ConfigError(f"`top` must be >= 1, got {top}")
    if not margin >= 0 or margin == float("inf"):
        raise ConfigError(f"`margin` must be a finite number >= 0, got {margin}")
    nouns = nouns or load_nouns()
    embeddings = noun_embeddings(scorers, [n.lemma for n in nouns], cache=cache, progress=progress)
    ranked = rank_nouns(image_embedding(scorers, images), embeddings, nouns, max(top, CANDIDATES))
    chosen = choose(ranked, strategy, margin)
    return ([chosen] + [s for s in ranked if s != chosen])[:top]
