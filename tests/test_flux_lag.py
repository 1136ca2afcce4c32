"""LAG on Flux (MMDiT joint attention): the capture processor, the masks and where they apply.

A tiny ``FluxTransformer2DModel`` (2 double-stream and 2 single-stream blocks, 2 heads) built from a
config, saved and loaded with ``from_pretrained``. The residuals wrap the two kinds of layers directly
(``transformer_blocks.i.attn.to_out.0``, ``single_transformer_blocks.i.proj_out``), and localized
sampling is asked of ``FluxLag``: what the Flux backbone answers for LAG, one line per method.

What happens to text tokens: a single block's ``proj_out`` sees [text, image]. Unmasked (training,
normal sampling, merge, LoRA exports) its residual applies to every token, text included, as a plain
wrapped Linear does. LAG applies it to image tokens inside the mask, and to the text tokens when the
concept's mask in that block is not empty: every mask 1 is normal sampling, every mask 0 the base,
exactly, and the text tokens matter downstream (checked below).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from persres.backbones import ProbsHook
from persres.backbones import flux_attention as flux
from persres.backbones.flux import FLUX
from persres.backbones.flux_attention import FluxCaptureProcessor
from persres.core.attention import swapped_processors
from persres.core.lag import LagState, localized, mask_setters, requested_keys
from persres.core.residuals import ResidualProjOut, find_residuals, residuals_disabled
from persres.errors import ModelError

T, SIDE = 7, 4  # text positions; the image is SIDE x SIDE tokens
HW = SIDE * SIDE
CONFIG = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "guidance_embeds": False,
    "axes_dims_rope": (2, 2, 4),
}
Inputs = dict[str, torch.Tensor]
Call = tuple[ResidualProjOut, torch.Tensor, torch.Tensor]  # a layer, its input and its output


class FluxLag:
    """The Flux backbone's LAG answers: its own capture and mask layout, and the attention layers it will
    return once LAG is enabled on Flux (it refuses today)."""

    def attention_layers(self, denoiser: nn.Module, target: str) -> dict[str, FluxAttention]:
        return flux.attention_layers(denoiser, target)

    def capture_processor(self, hook: ProbsHook, keys: torch.Tensor, text_length: int) -> object:
        return FLUX.capture_processor(hook, keys, text_length)

    def residual_mask(
        self, denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int
    ) -> torch.Tensor:
        return FLUX.residual_mask(denoiser, target, mask, text_length)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flux") / "transformer"
    FluxTransformer2DModel.from_config(CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture
def transformer(saved: Path, monkeypatch: pytest.MonkeyPatch) -> FluxTransformer2DModel:
    monkeypatch.setattr("persres.core.lag.backbone_of_denoiser", lambda denoiser: FluxLag())
    return FluxTransformer2DModel.from_pretrained(saved).eval()


def flux_inputs(batch: int = 2, seed: int = 0) -> Inputs:
    """Packed latents with the pipeline's image position ids (row, column), text ids all zero."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    img_ids = torch.stack([torch.zeros(HW), rows.flatten().float(), cols.flatten().float()], dim=-1)
    return {
        "hidden_states": torch.randn(batch, HW, CONFIG["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, T, CONFIG["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, CONFIG["pooled_projection_dim"], generator=g),
        "timestep": torch.full((batch,), 0.6),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(T, 3),
    }


def run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def attentions(model: nn.Module) -> dict[str, FluxAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FluxAttention)}


def targets(model: FluxTransformer2DModel) -> dict[str, nn.Module]:
    double = enumerate(model.transformer_blocks)
    single = enumerate(model.single_transformer_blocks)
    return {f"transformer_blocks.{i}.attn.to_out.0": b.attn.to_out[0] for i, b in double} | {
        f"single_transformer_blocks.{i}.proj_out": b.proj_out for i, b in single
    }


def wrap(model: FluxTransformer2DModel, rank: int = 2, seed: int = 1) -> dict[str, ResidualProjOut]:
    """Residuals with non-zero factors on the 4 target layers."""
    g = torch.Generator().manual_seed(seed)
    wrapped = {}
    for path, layer in targets(model).items():
        wrapper = ResidualProjOut(layer, rank)
        with torch.no_grad():
            wrapper.A.copy_(torch.randn(wrapper.A.shape, generator=g) * 0.3)
            wrapper.B.copy_(torch.randn(wrapper.B.shape, generator=g) * 0.3)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
        wrapped[path] = wrapper
    return wrapped


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding on (B, S, heads, D), pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    cos, sin = (r[None, :, None, :] for r in rotary)
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


def explicit_softmax(attn: FluxAttention, call: dict) -> torch.Tensor:
    """The full joint attention (B, heads, L, L) over [text, image], written out by hand."""

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (attn.heads, -1))  # (B, S, heads, D)

    hidden, context = call["hidden_states"], call.get("encoder_hidden_states")
    q, k = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
    if context is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(context))), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(context))), k], dim=1)
    q, k = rotate(q, call["image_rotary_emb"]), rotate(k, call["image_rotary_emb"])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1).float()


@contextlib.contextmanager
def attention_calls(model: nn.Module) -> Iterator[dict[str, dict]]:
    """The keyword arguments of every attention layer's call inside the block, keyed by layer path."""
    calls: dict[str, dict] = {}

    def keep(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[name] = kwargs

    handles = [
        m.register_forward_pre_hook(functools.partial(keep, name), with_kwargs=True)
        for name, m in attentions(model).items()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def full_maps(model: nn.Module, calls: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Each attention layer's full joint softmax (B, heads, T + HW, T + HW) for the recorded calls."""
    with torch.no_grad():
        return {name: explicit_softmax(model.get_submodule(name), call) for name, call in calls.items()}


def block_of(path: str) -> str:
    """The name localized sampling records a residual's mask under."""
    return path.removesuffix(".proj_out")


def maps_of(model: nn.Module, maps: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    """The image queries' head-mean map (B, HW, T + HW) of the attention that places ``path``."""
    [layer] = flux.attention_layers(model, path)
    return maps[layer][:, :, T:].mean(dim=1)


def threshold(score: torch.Tensor) -> torch.Tensor:
    return (score > score.median(dim=-1, keepdim=True).values).float()


def test_capture_processor_equals_flux_attention(transformer: FluxTransformer2DModel) -> None:
    inputs = flux_inputs()
    expected = run(transformer, inputs)
    keys = torch.tensor([2, 4])
    seen: list[tuple[tuple[int, ...], list[int]]] = []

    def hook(probs: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        assert keys is not None
        seen.append((tuple(probs.shape), keys.tolist()))

    layers = attentions(transformer)
    assert len(layers) == 4  # 2 double-stream and 2 single-stream blocks
    with swapped_processors(transformer, {p: FluxCaptureProcessor(hook, keys, T) for p in layers}):
        got = run(transformer, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, expected)  # the same operations as FluxAttnProcessor: even bitwise
    assert seen == [((2, 2, HW, 2), [2, 4])] * 4  # (B, heads, image queries, requested columns)
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in transformer.attn_processors.values())


@pytest.mark.parametrize("chunk", [flux.CHUNK_ELEMENTS, 2 * 2 * (T + HW) * 3, 1])  # all, 3 rows, 1 row
def test_captured_probabilities_are_a_slice_of_the_full_joint_softmax(
    transformer: FluxTransformer2DModel, chunk: int
) -> None:
    keys = torch.tensor([0, 3, 6])
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, probs: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        captured[name] = probs

    layers = attentions(transformer)
    processors = {p: FluxCaptureProcessor(functools.partial(keep, p), keys, T, chunk) for p in layers}
    with swapped_processors(transformer, processors), attention_calls(transformer) as calls:
        run(transformer, flux_inputs())
    full = full_maps(transformer, calls)  # (B, heads, T + HW, T + HW) per layer, with rotary embeddings
    assert sorted(full) == sorted(layers)
    for name, maps in full.items():
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))  # over ALL keys
        expected = maps[:, :, T:][..., keys]  # image queries -> the requested text keys
        torch.testing.assert_close(captured[name], expected, atol=1e-6, rtol=1e-5)
        assert expected.sum(-1).max() < 0.99  # the image keys take their share of the softmax


def test_a_blocks_mask_comes_from_the_identifier_and_class_columns(
    transformer: FluxTransformer2DModel,
) -> None:
    """Hand-set attention: V* (column 2) draws image positions 0-3 in head 0, the class word (column 4)
    positions 4-7 in head 1; another word (column 5) draws positions 8-15 strongly and must not count."""
    columns = torch.zeros(1, 1, T)
    columns[0, 0, [2, 4]] = 1
    keys = torch.tensor([2, 4, 5])  # handed over, in this order
    probs = torch.full((1, 2, HW, 3), 0.001)
    probs[0, 0, :4, 0] = 0.5
    probs[0, 1, 4:8, 1] = 0.5
    probs[0, :, 8:, 2] = 0.9
    probs[0, 0, :, 0] += torch.arange(HW) * 1e-4  # no ties
    expected = torch.zeros(HW)
    expected[:8] = 1
    state = LagState(columns, record=True)
    for path, wrapper in wrap(transformer).items():
        shape = functools.partial(flux.residual_mask, transformer, path, text_length=T)
        [hook] = mask_setters(state, path, wrapper, 1, shape)
        hook(probs, keys)
        assert torch.equal(state.records[0][path], expected.view(1, 1, HW))  # the image positions
        assert wrapper.mask is not None
        leading = T if path.startswith("single_") else 0  # proj_out of a single block sees [text, image]
        assert torch.equal(wrapper.mask, torch.cat([torch.ones(leading), expected]).view(1, 1, -1))
        shaped = flux.residual_mask(transformer, path, torch.zeros(1, 1, HW), T)  # an empty mask: no text
        assert torch.equal(shaped, torch.zeros(1, 1, leading + HW))


def test_masks_follow_each_prompts_own_columns_through_the_real_attention(
    transformer: FluxTransformer2DModel,
) -> None:
    columns = torch.zeros(2, 1, T)  # two prompts in one batch, the words at other positions
    columns[0, 0, [2, 4]] = 1
    columns[1, 0, [1, 5]] = 1
    assert requested_keys(columns).tolist() == [1, 2, 4, 5]
    wrap(transformer)
    state = LagState(columns, record=True)
    with localized(transformer, state), attention_calls(transformer) as calls:
        run(transformer, flux_inputs())
    full = full_maps(transformer, calls)  # the same pass: earlier blocks' masks shaped these maps
    assert sorted(state.records[0]) == sorted(block_of(p) for p in targets(transformer))
    for path in targets(transformer):
        mask, maps = state.records[0][block_of(path)], maps_of(transformer, full, path)  # (B, HW, L)
        for n, words in ((0, [2, 4]), (1, [1, 5])):
            assert torch.equal(mask[n, 0], threshold(maps[n][:, words].sum(-1)))
        assert (mask.sum(-1) == HW // 2).all()


def test_empty_masks_give_the_base_and_full_masks_normal_sampling(
    transformer: FluxTransformer2DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = flux_inputs()
    base = run(transformer, inputs)
    wrapped = wrap(transformer)
    normal = run(transformer, inputs)  # unmasked: the residuals on every token the layers see
    assert (normal - base).abs().max() > 1e-3
    singles = [w for p, w in wrapped.items() if p.startswith("single_")]
    with image_tokens_only(singles):
        reference = run(transformer, inputs)  # single blocks' text tokens without residual, by hand
    assert (reference - normal).abs().max() > 1e-4  # the single blocks' text tokens matter downstream
    columns = torch.zeros(1, 1, T)
    columns[0, 0, 3] = 1
    outputs = {}
    for value in (0.0, 1.0):
        fill = lambda score, batch, v=value: torch.full((batch, *score.shape[1:]), v)  # noqa: E731
        monkeypatch.setattr("persres.core.lag.binarize", fill)
        with localized(transformer, LagState(columns)), recorded(singles) as seen:
            outputs[value] = run(transformer, inputs)
        for wrapper, x, out in seen:  # text tokens: the base layer's (mask 0) or the residual's (mask 1)
            expected = wrapper.base(x) if value == 0.0 else out_unmasked(wrapper, x)
            torch.testing.assert_close(out[:, :T], expected[:, :T], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs[0.0], base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[1.0], normal, atol=1e-5, rtol=1e-5)
    assert all(w.mask is None for w in find_residuals(transformer).values())
    with residuals_disabled(transformer):
        torch.testing.assert_close(run(transformer, inputs), base, atol=0, rtol=0)


def test_two_concepts_each_in_its_own_mask(transformer: FluxTransformer2DModel) -> None:
    wrappers = wrap(transformer)
    for wrapper in wrappers.values():
        wrapper.groups = (1, 1)  # two concepts of rank 1 each
    columns = torch.zeros(1, 2, T)
    columns[0, 0, [1, 2]] = 1  # V1* and its class word
    columns[0, 1, [4, 5]] = 1  # V2* and its class word
    state = LagState(columns, record=True)
    g = torch.Generator().manual_seed(3)
    differs = []
    with localized(transformer, state):
        with attention_calls(transformer) as calls:
            run(transformer, flux_inputs(batch=1))
        full = full_maps(transformer, calls)
        for path, wrapper in wrappers.items():
            mask, maps = state.records[0][block_of(path)], maps_of(transformer, full, path)  # (1, 2, HW)
            for concept, words in ((0, [1, 2]), (1, [4, 5])):
                assert torch.equal(mask[0, concept], threshold(maps[0][:, words].sum(-1)))
            differs.append(not torch.equal(mask[0, 0], mask[0, 1]))
            leading = T if path.startswith("single_") else 0
            x = torch.randn(1, leading + HW, wrapper.base.in_features, generator=g)
            for concept in (0, 1):  # each concept's residual only inside its own mask (text: if not empty)
                alone = only_concept(wrapper, x, concept)
                absent = 1 - mask[0, concept].max()
                outside = torch.cat([absent.expand(leading), 1 - mask[0, concept]]).bool()
                assert alone[0, outside].abs().max() == 0 and alone.abs().max() > 0
    assert any(differs)


def test_which_layers_give_a_blocks_maps_and_which_tokens_are_image(
    transformer: FluxTransformer2DModel,
) -> None:
    assert flux.attention_layers(transformer, "transformer_blocks.1.attn.to_out.0") == {
        "transformer_blocks.1.attn": transformer.transformer_blocks[1].attn
    }
    assert list(flux.attention_layers(transformer, "single_transformer_blocks.0.proj_out")) == [
        "single_transformer_blocks.0.attn"
    ]
    assert flux.image_tokens(transformer, "transformer_blocks.0.attn.to_out.0", T) == slice(0, None)
    assert flux.image_tokens(transformer, "single_transformer_blocks.1.proj_out", T) == slice(T, None)
    wrap(transformer)  # the same answers through the residual wrappers
    assert flux.image_tokens(transformer, "single_transformer_blocks.1.proj_out", T) == slice(T, None)
    with pytest.raises(ModelError, match="neither a double block's attn.to_out.0"):
        flux.image_tokens(transformer, "transformer_blocks.0.attn.to_add_out", T)
    with pytest.raises(ModelError, match="not inside a Flux transformer block"):
        flux.attention_layers(transformer, "proj_out")


def test_processors_and_masks_are_restored_and_a_wrong_text_length_is_refused(
    transformer: FluxTransformer2DModel,
) -> None:
    wrap(transformer)
    before = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match="cover 9 text positions but this attention reads 7"):
        with localized(transformer, LagState(torch.ones(1, 1, 9))):  # columns of a longer text
            run(transformer, flux_inputs())
    assert dict(transformer.attn_processors) == before
    assert all(w.mask is None for w in find_residuals(transformer).values())


def only_concept(wrapper: ResidualProjOut, x: torch.Tensor, concept: int) -> torch.Tensor:
    """The wrapper's masked residual with the other concept's factor zeroed."""
    saved = wrapper.A.detach().clone()
    with torch.no_grad():
        wrapper.A[:, 1 - concept] = 0
        alone = wrapper.residual(x)
        wrapper.A.copy_(saved)
    return alone


def out_unmasked(wrapper: ResidualProjOut, x: torch.Tensor) -> torch.Tensor:
    """The wrapper's output for ``x`` with no mask: its residual on every token."""
    mask, wrapper.mask = wrapper.mask, None
    try:
        with torch.no_grad():
            return wrapper(x)
    finally:
        wrapper.mask = mask


@contextlib.contextmanager
def image_tokens_only(wrappers: list[ResidualProjOut]) -> Iterator[None]:
    """The reference for LAG with every mask 1: single blocks' residuals on image tokens only, by a
    forward hook that puts the base layer's output back on the text tokens."""

    def text_as_base(module: ResidualProjOut, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, :T] = module.base(args[0])[:, :T]
        return out

    handles = [w.register_forward_hook(text_as_base) for w in wrappers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def recorded(wrappers: list[ResidualProjOut]) -> Iterator[list[Call]]:
    """(wrapper, input, output) of every call of ``wrappers`` inside the block."""
    seen: list[Call] = []
    handles = [w.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for w in wrappers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
