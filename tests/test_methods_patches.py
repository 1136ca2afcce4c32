"""Every patch a method makes to a pipeline has an exact inverse (``persres.methods.patches``): after
``prepare`` or ``load`` and ``unpatch``, the processors are the base's own objects, no module has a
forward hook, every module, flag and output is the base's; a second ``prepare`` or ``load`` on a
patched pipeline is refused by name, and a failed one leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import tiny_config, unet_inputs

from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError
from persres.methods import METHODS as CATALOG
from persres.methods import get_method
from persres.methods.patches import unpatch
from persres.methods.protocol import Trainable

METHODS = sorted(CATALOG)
PROMPT = "a photo of a dog"  # no learned token: the base encodes it exactly as before


@dataclass
class Snapshot:
    """What a patch could change in a pipeline, and what the pipeline computes."""

    processors: dict[str, object]
    modules: dict[str, type]
    hooks: int
    flags: dict[str, bool]
    encoded: torch.Tensor
    output: torch.Tensor


def snapshot(pipe: StableDiffusionPipeline) -> Snapshot:
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    modules = {f"{p}.{n}": m for p, part in parts.items() for n, m in part.named_modules()}
    ids = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
    latents, steps, _ = unet_inputs(pipe.unet, batch=1)
    with torch.no_grad():
        encoded = pipe.text_encoder(ids)[0]
        output = pipe.unet(latents, steps, encoder_hidden_states=encoded).sample
    return Snapshot(
        processors=dict(pipe.unet.attn_processors),
        modules={name: type(module) for name, module in modules.items()},
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules.values()),
        flags={f"{p}.{n}": q.requires_grad for p, part in parts.items() for n, q in part.named_parameters()},
        encoded=encoded,
        output=output,
    )


def assert_is_base(pipe: StableDiffusionPipeline, before: Snapshot) -> None:
    after = snapshot(pipe)
    assert after.processors.keys() == before.processors.keys()
    moved = [k for k, proc in after.processors.items() if proc is not before.processors[k]]
    assert not moved, f"processors not the base's own objects: {moved[:3]}"
    assert after.modules == before.modules
    assert after.hooks == before.hooks == 0
    assert after.flags == before.flags
    assert torch.equal(after.encoded, before.encoded)
    assert torch.equal(after.output, before.output)


def prepare(
    method: str, pipe: StableDiffusionPipeline, base: Path, photos: Path, **changes: object
) -> Trainable:
    config = tiny_config(base, photos, method=method, **changes)
    return get_method(method).prepare(pipe, config, torch.Generator().manual_seed(0))


def perturb(method: str, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
    """Trained-looking values (DreamBooth's are the U-Net's own weights: training, not a patch)."""
    if method == "dreambooth":
        return
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainable.params.values():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    get_method(method).after_step(pipe, trainable)  # Textual Inversion puts the other rows back


@pytest.mark.parametrize("method", METHODS)
def test_prepare_then_unpatch_gives_the_base_back(method: str, conv_base: Path, photos: Path) -> None:
    pipe = load_pipeline(str(conv_base))
    before = snapshot(pipe)
    perturb(method, pipe, prepare(method, pipe, conv_base, photos))
    unpatch(pipe)
    assert_is_base(pipe, before)


@pytest.mark.parametrize("method", METHODS)
def test_a_second_prepare_or_load_on_a_patched_pipeline_is_refused_by_name(
    method: str, conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(conv_base))
    prepare(method, pipe, conv_base, photos)
    processors = dict(pipe.unet.attn_processors)
    named = f"already holds persres' patches from '{method}''s prepare"
    with pytest.raises(ConfigError, match=named):  # another token, so the tokenizer does not refuse it
        prepare(method, pipe, conv_base, photos, token="other")
    with pytest.raises(ConfigError, match=named):
        get_method(method).load(pipe, tmp_path / "a result")
    assert all(
        pipe.unet.attn_processors[k] is p for k, p in processors.items()
    )  # the refusal changed nothing


@pytest.mark.parametrize("method", ["residuals", "lora", "dreambooth"])
def test_after_unpatch_a_prepare_is_as_on_a_fresh_pipeline(
    method: str, conv_base: Path, photos: Path
) -> None:
    """(A method that adds a token cannot add it again: the tokenizer keeps it, see ``patches``.)"""
    pipe, fresh = load_pipeline(str(conv_base)), load_pipeline(str(conv_base))
    prepare(method, pipe, conv_base, photos)
    unpatch(pipe)
    again, first = prepare(method, pipe, conv_base, photos), prepare(method, fresh, conv_base, photos)
    assert again.params.keys() == first.params.keys()
    assert all(torch.equal(again.params[k], first.params[k]) for k in first.params)


@pytest.fixture(scope="module")
def results(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved result of every method, from perturbed (trained-looking) values."""
    root, found = tmp_path_factory.mktemp("results"), {}
    for method in METHODS:
        pipe = load_pipeline(str(conv_base))
        trainable = prepare(method, pipe, conv_base, photos)
        perturb(method, pipe, trainable)
        metadata = {"base_model": str(conv_base), "token": "sks", "class_word": "dog", "step": "1"}
        found[method] = get_method(method).save(pipe, trainable, root / method, metadata)
    return found


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dreambooth"])
def test_load_then_unpatch_gives_the_base_back(
    method: str, conv_base: Path, results: dict[str, Path]
) -> None:
    pipe = load_pipeline(str(conv_base))
    before = snapshot(pipe)
    get_method(method).load(pipe, results[method])
    unpatch(pipe)
    assert_is_base(pipe, before)


@pytest.mark.parametrize("method", METHODS)
def test_a_second_load_is_refused_by_name(method: str, conv_base: Path, results: dict[str, Path]) -> None:
    pipe = load_pipeline(str(conv_base))
    get_method(method).load(pipe, results[method])
    with pytest.raises(ConfigError, match=f"already holds persres' patches from '{method}''s load"):
        get_method(method).load(pipe, results[method])


def test_a_dreambooth_load_is_not_undone_but_refused_by_name(
    conv_base: Path, results: dict[str, Path]
) -> None:
    """Its inverse would keep a second U-Net in memory: the fix is named instead."""
    pipe = load_pipeline(str(conv_base))
    get_method("dreambooth").load(pipe, results["dreambooth"])
    with pytest.raises(ConfigError, match="'dreambooth''s load cannot be undone .*U-Net.*load a fresh base"):
        unpatch(pipe)


def test_a_refused_prepare_leaves_the_base_as_it_was(conv_base: Path, photos: Path) -> None:
    """Custom Diffusion refuses a token that cannot name its file after its processors are set: they
    are put back, and the pipeline prepares afterwards."""
    pipe = load_pipeline(str(conv_base))
    before = snapshot(pipe)
    with pytest.raises(ConfigError, match="cannot hold / or"):
        prepare("custom-diffusion", pipe, conv_base, photos, token="a/b")
    assert_is_base(pipe, before)
    prepare("custom-diffusion", pipe, conv_base, photos)
