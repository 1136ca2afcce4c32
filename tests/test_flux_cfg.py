"""A Flux model without a guidance embedding (Flux.1-schnell's layout; the toy Flux base's): no guidance by
default (one transformer call a step, as schnell samples), and a given `guidance` above 1 is true
classifier-free guidance (FluxPipeline's ``true_cfg_scale`` against the empty prompt: two calls a step).
LAG then makes its masks in the prompt's call and keeps them for the negative prompt's, so every mask 1
is normal sampling and every mask 0 the base, as with the distilled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_argv

from persres import load_concepts
from persres.backbones import default_guidance_for_base
from persres.cli import main
from persres.core.pipeline import load_pipeline, release_text_encoders
from persres.core.residuals import residuals_disabled
from persres.inference.sampling import Sample, SampleSettings, encode_prompts, sample
from persres.testing.tiny import save_tiny_flux_pipeline

PROMPTS = ["a photo of a V* dog on the beach"]


@pytest.fixture(scope="module")
def schnell_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("base") / "tiny-flux-schnell", guidance=False)


@pytest.fixture(scope="module")
def schnell_run(schnell_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "schnell"
    assert main(train_argv(schnell_base, photos, run, "--steps", "3", "--lr", "0.05")) == 0
    return run


def drawn(pipe: object, settings: SampleSettings, sampler: str = "normal", **kwargs: object) -> list[Sample]:
    concepts = [c for c in pipe.concepts]  # type: ignore[attr-defined]
    return sample(pipe, PROMPTS, concepts, settings, sampler, progress=False, **kwargs)  # type: ignore[arg-type]


def pixels(item: Sample) -> np.ndarray:
    return np.asarray(item.image, dtype=np.int16)


@pytest.fixture
def pipe(schnell_base: Path, schnell_run: Path) -> object:
    pipe = load_pipeline(str(schnell_base))
    pipe.concepts = load_concepts(pipe.transformer, [schnell_run])  # type: ignore[attr-defined]
    return pipe


def calls_per_image(pipe: object, settings: SampleSettings, monkeypatch: pytest.MonkeyPatch) -> int:
    count = [0]
    transformer = pipe.transformer  # type: ignore[attr-defined]
    original = type(transformer).forward

    def counted(self: object, *args: object, **kwargs: object) -> object:
        count[0] += 1
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(transformer), "forward", counted)
        drawn(pipe, settings)
    return count[0]


def test_no_guidance_by_default_and_true_cfg_when_given(
    schnell_base: Path, flux_base: Path, pipe: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_guidance_for_base(str(schnell_base)) == 1.0
    assert default_guidance_for_base(str(flux_base)) == 3.5  # the distilled model's
    default = SampleSettings(steps=2, height=16, width=16)
    assert calls_per_image(pipe, default, monkeypatch) == 2  # one call a step
    [image] = drawn(pipe, default)
    assert image.guidance == 1.0
    guided = SampleSettings(steps=2, guidance=4.0, height=16, width=16)
    assert calls_per_image(pipe, guided, monkeypatch) == 4  # the prompt's and the empty prompt's
    assert np.abs(pixels(drawn(pipe, guided)[0]) - pixels(image)).max() > 1


def test_lag_with_true_cfg_makes_masks_once_a_step_and_masks_0_1_give_base_and_normal(
    pipe: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SampleSettings(steps=2, guidance=4.0, height=16, width=16)
    made = [0]
    real = __import__("persres.core.lag", fromlist=["binarize"]).binarize

    def counted(score: torch.Tensor, batch: int) -> torch.Tensor:
        made[0] += 1
        return real(score, batch)

    with monkeypatch.context() as patch:
        patch.setattr("persres.core.lag.binarize", counted)
        [normal, lag] = drawn(pipe, settings, "both", save_masks=True)
    blocks = {block for masks in lag.masks.values() for block in masks}
    assert len(blocks) == 4 and sorted(lag.masks) == [0, 1]
    assert made[0] == 2 * len(blocks)  # per step and block: the negative prompt's call keeps the masks
    transformer = pipe.transformer  # type: ignore[attr-defined]
    with residuals_disabled(transformer):
        [base] = drawn(pipe, settings)
    assert np.abs(pixels(normal) - pixels(base)).max() > 1
    for value, expected in ((0.0, base), (1.0, normal)):
        fill = lambda score, batch, v=value: torch.full((batch, *score.shape[1:]), v)  # noqa: E731
        monkeypatch.setattr("persres.core.lag.binarize", fill)
        [image] = drawn(pipe, settings, "lag")
        assert np.abs(pixels(image) - pixels(expected)).max() <= 1, value


def test_true_cfg_from_embeddings_encoded_before_the_release_equals_from_text(pipe: object) -> None:
    settings = SampleSettings(steps=2, guidance=4.0, height=16, width=16)
    [from_text] = drawn(pipe, settings)
    encoded = encode_prompts(pipe, PROMPTS, pipe.concepts)  # type: ignore[arg-type, attr-defined]
    assert {"negative_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(next(iter(encoded.values())))
    release_text_encoders(pipe)
    [from_embeddings] = drawn(pipe, settings, encoded=encoded)
    assert np.array_equal(pixels(from_embeddings), pixels(from_text))
