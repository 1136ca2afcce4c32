"""LAG sampling: capture processor, masks, restoration, and several concepts in one image."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import drop_model_max_length, randomize_residuals, run_unet, unet_inputs
from transformers import PreTrainedTokenizerBase

from persres import add_residuals, remove_residuals, residuals_disabled, save_residuals
from persres.backbones.unet import cross_attentions
from persres.core.attention import CaptureCrossAttnProcessor, swapped_processors
from persres.core.lag import LagState, binarize, block_mask, localized
from persres.core.pipeline import load_pipeline
from persres.core.residuals import ResidualConfig, ResidualProjOut, find_residuals
from persres.errors import ConfigError
from persres.formats.concepts import Concept, load_concepts, plan_prompts, word_spans
from persres.inference.sampling import SampleSettings, sample

SETTINGS = SampleSettings(steps=3, guidance=7.5, height=16, width=16, seed=0)


def concept_file(base: Path, folder: Path, token: str, class_word: str, seed: int) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    add_residuals(pipe.unet, ResidualConfig(rank=2))
    randomize_residuals(pipe.unet, std=0.5, seed=seed)
    return save_residuals(pipe.unet, folder / f"{token}.safetensors", token=token, class_word=class_word)


@pytest.fixture
def pipe(base: Path) -> StableDiffusionPipeline:
    return load_pipeline(str(base))  # DDIM, as persres samples


@pytest.fixture
def dog(base: Path, tmp_path: Path) -> Path:
    return concept_file(base, tmp_path, "sks", "dog", seed=1)


@pytest.fixture
def cat(base: Path, tmp_path: Path) -> Path:
    return concept_file(base, tmp_path, "zwx", "cat", seed=2)


def pixels(samples: list) -> list[np.ndarray]:
    return [np.asarray(s.image, dtype=np.int16) for s in samples]


def test_capture_processor_equals_default_attention(pipe: StableDiffusionPipeline) -> None:
    unet = pipe.unet
    inputs = unet_inputs(unet)
    expected = run_unet(unet, inputs)
    seen: list[tuple[int, ...]] = []
    processors = {
        p: CaptureCrossAttnProcessor(lambda probs: seen.append(tuple(probs.shape)))
        for p in cross_attentions(unet, "")
    }
    assert len(processors) == 4 and all(p.endswith("attn2") for p in processors)
    with swapped_processors(unet, {p.lstrip("."): proc for p, proc in processors.items()}):
        torch.testing.assert_close(run_unet(unet, inputs), expected, atol=1e-5, rtol=1e-5)
    assert len(seen) == 4 and all(shape[0] == 2 and shape[-1] == 7 for shape in seen)  # (B, heads, HW, T)


def test_block_mask_is_binary_half_and_shared_by_the_unconditional_half() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 4, 64, 7, generator=g).softmax(-1)  # [uncond; cond], 4 heads, 8x8, 7 tokens
    columns = torch.zeros(1, 1, 7)
    columns[0, 0, [2, 4]] = 1
    mask = block_mask(probs, columns)
    assert mask.shape == (2, 1, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[1].sum() == 32  # exactly half above the median
    assert torch.equal(mask[0], mask[1])
    score = probs[1].mean(0)[:, [2, 4]].sum(-1)  # independent: head mean, token sum
    assert torch.equal(mask[1, 0].bool(), score > score.median())


def test_processors_are_restored_after_sampling_and_after_an_error(
    pipe: StableDiffusionPipeline, dog: Path
) -> None:
    concepts = load_concepts(pipe.unet, [dog])
    before = dict(pipe.unet.attn_processors)
    sample(pipe, ["a V* dog"], concepts, SETTINGS, "lag", progress=False)
    assert dict(pipe.unet.attn_processors) == before
    state = LagState(torch.ones(1, 1, 77))
    with pytest.raises(RuntimeError, match="boom"), localized(pipe.unet, state):
        assert any(isinstance(p, CaptureCrossAttnProcessor) for p in pipe.unet.attn_processors.values())
        raise RuntimeError("boom")
    assert dict(pipe.unet.attn_processors) == before
    assert all(w.mask is None for w in find_residuals(pipe.unet).values())


def test_empty_mask_gives_the_base_model_and_full_mask_gives_normal_sampling(
    pipe: StableDiffusionPipeline, dog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concepts = load_concepts(pipe.unet, [dog])
    prompts = ["a photo of a V* dog on the beach"]
    normal = pixels(sample(pipe, prompts, concepts, SETTINGS, "normal", progress=False))
    with residuals_disabled(pipe.unet):
        base = pixels(sample(pipe, prompts, concepts, SETTINGS, "normal", progress=False))
    assert np.abs(normal[0] - base[0]).max() > 0  # the residuals change the image

    def zeros(score: torch.Tensor, batch: int) -> torch.Tensor:  # score: (N, groups, HW)
        return torch.zeros(batch, score.shape[1], score.shape[2])

    def ones(score: torch.Tensor, batch: int) -> torch.Tensor:
        return zeros(score, batch) + 1

    # one U-Net pass, in floats: M = 0 is the base model, M = 1 the personalized one
    inputs = unet_inputs(pipe.unet)
    with residuals_disabled(pipe.unet):
        base_out = run_unet(pipe.unet, inputs)
    full_out = run_unet(pipe.unet, inputs)
    for mask, expected in ((zeros, base_out), (ones, full_out)):
        monkeypatch.setattr("persres.core.lag.binarize", mask)
        with localized(pipe.unet, LagState(torch.ones(1, 1, 7))):
            torch.testing.assert_close(run_unet(pipe.unet, inputs), expected, atol=1e-5, rtol=1e-5)
        # whole images: equal up to the 8-bit rounding of attention computed without SDPA
        image = pixels(sample(pipe, prompts, concepts, SETTINGS, "lag", progress=False))[0]
        assert np.abs(image - (base[0] if mask is zeros else normal[0])).max() <= 1


def test_lag_masks_are_recorded_binary_and_half(pipe: StableDiffusionPipeline, dog: Path) -> None:
    concepts = load_concepts(pipe.unet, [dog])
    [normal, lag] = sample(
        pipe, ["a V* dog in the snow"], concepts, SETTINGS, "both", save_masks=True, progress=False
    )
    assert (normal.sampler, lag.sampler) == ("normal", "lag") and not normal.masks
    assert sorted(lag.masks) == [0, 1, 2]  # one entry per denoising step
    for blocks in lag.masks.values():
        assert len(blocks) == 4
        for mask in blocks.values():
            assert mask.shape[:2] == (1, 1) and set(mask.unique().tolist()) <= {0.0, 1.0}
            assert mask.sum() == mask.shape[-1] // 2
    assert not np.array_equal(np.asarray(normal.image), np.asarray(lag.image))


def test_words_are_located_by_tokenizing(pipe: StableDiffusionPipeline) -> None:
    tokenizer = pipe.tokenizer
    ids = tokenizer("a photo of a sks dog on the beach").input_ids
    assert positions(tokenizer, ids, "dog") == [6]
    assert positions(tokenizer, ids, "a") == [1, 4]
    assert positions(tokenizer, ids, "dog on") == [6, 7]  # a several-word class: all its sub-tokens
    assert positions(tokenizer, ids, "cat") == []


def test_lag_needs_the_identifier_and_the_class_word(pipe: StableDiffusionPipeline, dog: Path) -> None:
    concepts = load_concepts(pipe.unet, [dog])
    with pytest.raises(ConfigError, match="has no class word 'dog'"):
        sample(pipe, ["a photo of a V* on the beach"], concepts, SETTINGS, "lag", progress=False)
    with pytest.raises(ConfigError, match="has no V\\*"):
        sample(pipe, ["a photo of a dog"], concepts, SETTINGS, "lag", progress=False)
    sample(
        pipe, ["a photo of a V* on the beach"], concepts, SETTINGS, "normal", progress=False
    )  # fine without LAG


def test_placeholders_must_match_the_files() -> None:
    two = [Concept("sks", "dog", "dog.safetensors"), Concept("zwx", "cat", "cat.safetensors")]
    assert [p.expanded for p in plan_prompts(["a V1* dog and a V2* cat"], two)] == ["a sks dog and a zwx cat"]
    with pytest.raises(ConfigError, match="uses V\\* but 2 residual files"):
        plan_prompts(["a V* dog"], two)
    with pytest.raises(ConfigError, match="uses V3\\* but only 2"):
        plan_prompts(["a V1* dog, a V2* cat and a V3* cup"], two)
    with pytest.raises(ConfigError, match="cat.safetensors \\(V2\\*\\) is not used by any prompt"):
        plan_prompts(["a V1* dog"], two)
    assert plan_prompts(["a V1* dog"], two[:1])[0].expanded == "a sks dog"


def test_two_files_with_one_token_are_refused(
    pipe: StableDiffusionPipeline, base: Path, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = concept_file(base, tmp_path / "a", "sks", "dog", seed=1)
    second = concept_file(base, tmp_path / "b", "sks", "cat", seed=2)
    with pytest.raises(ConfigError, match="both use the identifier 'sks'"):
        load_concepts(pipe.unet, [first, second])
    assert not find_residuals(pipe.unet)


def test_one_file_through_the_multi_concept_path_equals_single_concept_lag(
    pipe: StableDiffusionPipeline, base: Path, dog: Path, tmp_path: Path
) -> None:
    concepts = load_concepts(pipe.unet, [dog])
    single = pixels(sample(pipe, ["a V* dog on the beach"], concepts, SETTINGS, "lag", progress=False))
    numbered = pixels(sample(pipe, ["a V1* dog on the beach"], concepts, SETTINGS, "lag", progress=False))
    assert np.array_equal(single[0], numbered[0])
    # a second concept whose residual is zero changes nothing: stacking is exact
    silent = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    add_residuals(silent.unet, ResidualConfig(rank=3))
    quiet = save_residuals(silent.unet, tmp_path / "quiet.safetensors", token="zwx", class_word="cat")
    remove_residuals(pipe.unet)
    both = load_concepts(pipe.unet, [dog, quiet])
    assert {w.groups for w in find_residuals(pipe.unet).values()} == {(2, 3)}
    stacked = pixels(
        sample(pipe, ["a V1* dog on the beach with a V2* cat"], both, SETTINGS, "lag", progress=False)
    )
    same_text = "a V* dog on the beach with a zwx cat"  # the same prompt, with only the dog as a concept
    alone = pixels(sample(pipe, [same_text], concepts_from(pipe, dog), SETTINGS, "lag", progress=False))
    assert np.abs(stacked[0] - alone[0]).max() <= 1  # float summation order only


def concepts_from(pipe: StableDiffusionPipeline, path: Path) -> list[Concept]:
    remove_residuals(pipe.unet)
    return load_concepts(pipe.unet, [path])


def test_each_residual_contributes_only_inside_its_own_mask(unet: torch.nn.Module) -> None:
    wrappers = add_residuals(unet, ResidualConfig(rank=2))
    randomize_residuals(unet)
    g = torch.Generator().manual_seed(5)
    for wrapper in wrappers.values():
        wrapper.groups = (1, 1)  # two concepts of rank 1 each
        m = wrapper.base.weight.shape[0]
        x = torch.randn(2, m, 4, 4, generator=g) if wrapper.is_conv else torch.randn(2, 16, m, generator=g)
        wrapper.mask = (torch.rand(2, 2, 16, generator=g) > 0.5).float()  # (N, concepts, HW)
        expected = unmasked(wrapper, x, 0) * spatial(wrapper, 0) + unmasked(wrapper, x, 1) * spatial(
            wrapper, 1
        )
        torch.testing.assert_close(wrapper.residual(x), expected, atol=1e-5, rtol=1e-5)
        for concept in (0, 1):
            saved = wrapper.A.detach().clone()
            with torch.no_grad():
                wrapper.A[:, 1 - concept] = 0  # only this concept left
            alone = wrapper.residual(x)
            assert alone[(spatial(wrapper, concept) == 0).expand_as(alone)].abs().max() == 0
            assert alone.abs().max() > 0
            with torch.no_grad():
                wrapper.A.copy_(saved)


def spatial(wrapper: ResidualProjOut, concept: int) -> torch.Tensor:
    """That concept's mask (N=2, HW=16), broadcastable to the wrapper's output."""
    mask = wrapper.mask[:, concept]
    return mask.view(2, 1, 4, 4) if wrapper.is_conv else mask.view(2, 16, 1)


def unmasked(wrapper: ResidualProjOut, x: torch.Tensor, concept: int) -> torch.Tensor:
    """A_g B_g x, computed independently of the wrapper."""
    delta = wrapper.A[:, [concept]] @ wrapper.B[[concept]]
    return torch.einsum("oc,nchw->nohw" if wrapper.is_conv else "oc,nlc->nlo", delta, x)


def test_two_concepts_get_their_own_masks(pipe: StableDiffusionPipeline, dog: Path, cat: Path) -> None:
    concepts = load_concepts(pipe.unet, [dog, cat])
    [lag] = sample(
        pipe, ["a V1* dog playing with a V2* cat"], concepts, SETTINGS, "lag", save_masks=True, progress=False
    )
    differs = [
        not torch.equal(mask[0, 0], mask[0, 1]) for blocks in lag.masks.values() for mask in blocks.values()
    ]
    assert any(differs)
    for blocks in lag.masks.values():
        for mask in blocks.values():
            assert mask.shape[1] == 2 and (mask.sum(-1) == mask.shape[-1] // 2).all()


def positions(tokenizer: PreTrainedTokenizerBase, ids: list[int], word: str) -> list[int]:
    """Every position covered by an occurrence of ``word``."""
    return [p for span in word_spans(tokenizer, ids, word) for p in span]


def test_a_base_whose_tokenizer_lacks_model_max_length(conv_base: Path, tmp_path: Path) -> None:
    loose = Path(shutil.copytree(conv_base, tmp_path / "loose"))
    drop_model_max_length(loose / "tokenizer")
    pipe = load_pipeline(str(loose))
    assert pipe.tokenizer.model_max_length == 77  # bounded by the text encoder's positions
    dog = concept_file(conv_base, tmp_path, "sks", "dog", seed=1)
    prompts = ["a photo of a V* dog on the beach"]
    got = sample(pipe, prompts, load_concepts(pipe.unet, [dog]), SETTINGS, "lag", progress=False)
    reference = load_pipeline(str(conv_base))
    want = sample(reference, prompts, load_concepts(reference.unet, [dog]), SETTINGS, "lag", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(got), pixels(want), strict=True))


def test_block_mask_for_a_batch_without_an_unconditional_half() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 4, 64, 7, generator=g).softmax(-1)  # two conditional prompts, no guidance
    columns = torch.zeros(2, 1, 7)
    columns[0, 0, 2] = columns[1, 0, 5] = 1
    mask = block_mask(probs, columns)
    assert mask.shape == (2, 1, 64) and (mask.sum(-1) == 32).all()
    for n, column in ((0, 2), (1, 5)):  # each prompt's own maps and columns
        score = probs[n].mean(0)[:, column]
        assert torch.equal(mask[n, 0].bool(), score > score.median())
    with pytest.raises(ValueError, match="attention batch 3 does not match 2"):
        block_mask(probs[:1].expand(3, -1, -1, -1), columns)


def test_lag_without_classifier_free_guidance(
    pipe: StableDiffusionPipeline, dog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = replace(SETTINGS, guidance=1.0)  # diffusers then runs the U-Net on the prompt alone
    concepts = load_concepts(pipe.unet, [dog])
    prompts = ["a photo of a V* dog on the beach"]
    batches: list[int] = []

    def spy(score: torch.Tensor, batch: int) -> torch.Tensor:
        batches.append(batch)
        return binarize(score, batch)

    monkeypatch.setattr("persres.core.lag.binarize", spy)
    [normal, lag] = sample(pipe, prompts, concepts, settings, "both", save_masks=True, progress=False)
    assert batches and set(batches) == {1}  # no unconditional half
    for blocks in lag.masks.values():
        for mask in blocks.values():
            assert mask.shape[:2] == (1, 1) and mask.sum() == mask.shape[-1] // 2
    with residuals_disabled(pipe.unet):
        base = pixels(sample(pipe, prompts, concepts, settings, "normal", progress=False))[0]
    assert np.abs(pixels([normal])[0] - base).max() > 0  # the residuals change the image

    def filled(value: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
        return lambda score, batch: torch.full((batch, score.shape[1], score.shape[2]), value)

    inputs = unet_inputs(pipe.unet, batch=1)
    with residuals_disabled(pipe.unet):
        base_out = run_unet(pipe.unet, inputs)
    full_out = run_unet(pipe.unet, inputs)
    for value, expected_out, expected in ((0.0, base_out, base), (1.0, full_out, pixels([normal])[0])):
        monkeypatch.setattr("persres.core.lag.binarize", filled(value))
        with localized(pipe.unet, LagState(torch.ones(1, 1, 7))):  # one U-Net pass, batch 1
            torch.testing.assert_close(run_unet(pipe.unet, inputs), expected_out, atol=1e-5, rtol=1e-5)
        image = pixels(sample(pipe, prompts, concepts, settings, "lag", progress=False))[0]
        assert np.abs(image - expected).max() <= 1  # 8-bit rounding of attention computed without SDPA
