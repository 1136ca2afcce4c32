"""Perfusion behind the method protocol: key locking exact at i*, nothing added orthogonally to it,
the gate, every other embedding row kept, strict state files, and save -> load into a fresh base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, train_argv, unet_inputs
from safetensors.torch import save_file

from persres.cli import main
from persres.core.pipeline import load_pipeline
from persres.errors import InputError
from persres.methods.perfusion import SAMPLE_GATE, TOKEN_PARAM, WEIGHTS, Perfusion, PerfusionTrainable
from persres.methods.protocol import RESULT
from persres.methods.rank_one import RankOneEdit, cross_attentions, remove_edits

METHOD = Perfusion()
TOKEN = "<sks>"
PROMPT = f"a photo of a {TOKEN} dog"


def prepared(base: Path) -> tuple[object, PerfusionTrainable]:
    pipe = load_pipeline(str(base))
    trainable = METHOD.prepare(pipe, tiny_config(base, Path("unused")), torch.Generator().manual_seed(0))
    assert isinstance(trainable, PerfusionTrainable)
    return pipe, trainable


def perturb(trainable: PerfusionTrainable, seed: int = 1) -> None:
    """Trained-looking values: every o*_v and the token's delta away from their start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable.params.values():
            p.add_(torch.randn(p.shape, generator=g))


def edits(pipe: object) -> dict[str, RankOneEdit]:
    return {n: m for n, m in pipe.unet.named_modules() if isinstance(m, RankOneEdit)}  # type: ignore[attr-defined]


def test_prepare_trains_the_token_and_the_values_only(base: Path) -> None:
    pipe, trainable = prepared(base)
    layers = cross_attentions(pipe.unet)
    assert set(trainable.params) == {TOKEN_PARAM} | {f"{n}.to_v.target" for n in layers}
    trained = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    targets = {id(p) for k, p in trainable.params.items() if k != TOKEN_PARAM}
    assert {id(p) for p in trained} == targets  # the base is frozen; the delta lives outside it
    width = pipe.text_encoder.config.hidden_size
    assert trainable.count() == width + sum(a.to_v.base.out_features for a in layers.values())
    assert trainable.text_trainable and len(edits(pipe)) == 2 * len(layers)


def test_key_locks_to_the_class_and_value_hits_its_target_at_i_star(conv_base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(trainable)
    METHOD.save(pipe, trainable, tmp_path, {"token": "sks", "class_word": "dog"})  # i* of the moved token
    concept = trainable.concept
    assert concept is not None
    concept.gate = None  # the rank-one update itself: exact at i*
    assert not torch.allclose(concept.i_star, concept.i_super)  # the embedding moved: a real test
    with torch.no_grad():
        for name, edit in edits(pipe).items():
            out = edit(concept.i_star[None, None])[0, 0]
            expected = edit.base(concept.i_super) if edit.key else edit.target
            assert (out - expected).abs().max() <= 1e-5, name


def orthogonal(concept: object, seed: int = 3) -> torch.Tensor:
    """Random encodings (1, 5, d) with no component along i* under C^-1: s(x) = 0."""
    u, i_star = concept.u(), concept.i_star  # type: ignore[attr-defined]
    x = torch.randn(1, 5, u.shape[0], generator=torch.Generator().manual_seed(seed))
    return x - (x @ u / (u @ i_star)).unsqueeze(-1) * i_star


def test_encodings_orthogonal_to_i_star_pass_unchanged_without_the_gate(conv_base: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(trainable)
    concept = trainable.concept
    assert concept is not None
    concept.gate = None
    x = orthogonal(concept)
    with torch.no_grad():
        for name, edit in edits(pipe).items():
            assert (edit(x) - edit.base(x)).abs().max() <= 1e-5, name


def test_the_gate_gives_far_encodings_almost_nothing(conv_base: Path) -> None:
    pipe, trainable = prepared(conv_base)
    perturb(trainable)
    concept = trainable.concept
    assert concept is not None
    beta, tau = concept.gate = SAMPLE_GATE
    far, near = torch.sigmoid(torch.tensor(-beta / tau)), torch.sigmoid(torch.tensor((1 - beta) / tau))
    assert far < 0.01 < 0.8 < near
    x = orthogonal(concept)
    with torch.no_grad():
        for name, edit in edits(pipe).items():
            o_star = edit.output_at_concept()
            assert torch.allclose(edit(x) - edit.base(x), (far * o_star).expand(1, 5, -1), atol=1e-5), name
            at_concept = edit(concept.i_star[None, None])[0, 0]
            assert torch.allclose(at_concept, near * o_star, atol=1e-5), name


def test_the_loss_reaches_the_token_and_every_value_target(conv_base: Path) -> None:
    """i* is read from the current embedding each time the training prompt is encoded (the loop
    re-encodes it every step), so the gradient reaches the token through the edits too."""
    pipe, trainable = prepared(conv_base)
    text = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert trainable.concept is not None and trainable.concept.i_star.requires_grad
    latents, steps, _ = unet_inputs(pipe.unet, batch=1)
    pipe.unet(latents, steps, encoder_hidden_states=text).sample.square().mean().backward()
    for name, p in trainable.params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_remove_edits_gives_the_base_back(conv_base: Path) -> None:
    pipe, _ = prepared(conv_base)
    fresh = load_pipeline(str(conv_base))
    remove_edits(pipe.unet)
    assert not edits(pipe)
    inputs = unet_inputs(fresh.unet)
    with torch.no_grad():
        latents, steps, text = inputs
        assert torch.equal(
            pipe.unet(latents, steps, encoder_hidden_states=text).sample,
            fresh.unet(latents, steps, encoder_hidden_states=text).sample,
        )


def test_after_step_keeps_every_other_row_exactly(conv_base: Path) -> None:
    pipe, trainable = prepared(conv_base)
    weight = pipe.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    optimizer = torch.optim.AdamW(list(trainable.params.values()), lr=1e-1, weight_decay=1e-2)
    for p in trainable.params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    METHOD.after_step(pipe, trainable)
    keep = torch.arange(weight.shape[0]) != trainable.row
    assert torch.equal(weight[keep], before[keep])
    assert not torch.equal(weight[trainable.row], before[trainable.row])


def test_saved_result_loads_into_a_fresh_base_to_the_same_outputs(base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(base)
    perturb(trainable)
    metadata = {"token": "sks", "class_word": "dog", "base_model": str(base), "step": "7"}
    written = METHOD.save(pipe, trainable, tmp_path, metadata)
    assert written == tmp_path / RESULT / WEIGHTS
    assert trainable.concept is not None
    trainable.concept.gate = SAMPLE_GATE  # the trained pipeline, as sampling sees it

    fresh = load_pipeline(str(base))
    concept = METHOD.load(fresh, tmp_path / RESULT)
    assert (concept.token, concept.class_word) == (TOKEN, "dog")
    latents, steps, _ = unet_inputs(fresh.unet, batch=1)
    outputs = []
    for p in (pipe, fresh):
        with torch.no_grad():
            text = p.encode_prompt(PROMPT, "cpu", 1, False)[0]
            outputs.append(p.unet(latents, steps, encoder_hidden_states=text).sample)
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    base_pipe = load_pipeline(str(base))
    with torch.no_grad():
        plain = base_pipe.unet(latents, steps, encoder_hidden_states=base_pipe.encode_prompt(
            "a photo of a dog dog", "cpu", 1, False)[0]).sample  # fmt: skip
    assert not torch.allclose(outputs[1], plain, atol=1e-4)  # the concept changes the output

    def image(p: object) -> np.ndarray:
        out = p(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")  # type: ignore[operator]
        return out.images

    assert np.abs(image(fresh) - image(pipe)).max() <= 1 / 255


def test_state_round_trip_is_exact(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    perturb(trainable)
    saved = {k: v.detach().clone() for k, v in trainable.params.items()}
    METHOD.save_state(trainable, tmp_path / "state.safetensors", {"step": "5"})
    perturb(trainable, seed=2)
    METHOD.load_state(trainable, tmp_path / "state.safetensors")
    assert all(torch.equal(trainable.params[k], v) for k, v in saved.items())


def test_damaged_state_is_refused_naming_file_and_tensor(conv_base: Path, tmp_path: Path) -> None:
    _, trainable = prepared(conv_base)
    file = tmp_path / "state.safetensors"
    tensors = {k: v.detach().clone() for k, v in trainable.params.items()}
    save_file({**tensors, TOKEN_PARAM: torch.zeros(7)}, str(file))
    with pytest.raises(InputError, match=rf"{file}: tensor {TOKEN_PARAM} is torch.float32 of shape \(7,\)"):
        METHOD.load_state(trainable, file)
    save_file({k: v for k, v in tensors.items() if k != TOKEN_PARAM}, str(file))
    with pytest.raises(InputError, match=rf"{file} .*missing tensors \['{TOKEN_PARAM}'\]"):
        METHOD.load_state(trainable, file)


def test_a_damaged_result_is_refused_naming_the_tensor(conv_base: Path, tmp_path: Path) -> None:
    pipe, trainable = prepared(conv_base)
    written = METHOD.save(pipe, trainable, tmp_path, {"token": "sks", "class_word": "dog"})
    from safetensors import safe_open

    with safe_open(str(written), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file({**tensors, "i_star": torch.zeros(3)}, str(written), metadata=meta)
    with pytest.raises(InputError, match=r"tensor i_star is .* of shape \(3,\)"):
        METHOD.load(load_pipeline(str(conv_base)), tmp_path / RESULT)


@pytest.mark.slow
def test_train_then_sample_through_the_cli(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--method", "perfusion", "--steps", "2")) == 0
    assert (run / RESULT / WEIGHTS).is_file()
    out = tmp_path / "samples"
    argv = ["sample", "--base", str(conv_base), "--residuals", str(run), "--prompt", "a photo of a V* dog",
            "--out", str(out), "--steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    [png] = out.glob("*.png")
    assert json.loads(png.with_suffix(".json").read_text())["expanded_prompt"] == f"a photo of a {TOKEN} dog"


def test_a_text_encoder_with_few_positions_prepares(tmp_path: Path) -> None:
    # the toy world's text encoder holds 24 positions: the corpus prompts of the key's covariance once
    # overflowed it (26 tokens) and crashed before the first step
    toy = Path(__file__).resolve().parents[1] / "models" / "toyworld-base"
    pipe = load_pipeline(str(toy))
    assert pipe.text_encoder.config.max_position_embeddings < 30
    config = tiny_config(toy, Path("unused"), resolution=32)
    trainable = METHOD.prepare(pipe, config, torch.Generator().manual_seed(0))
    assert trainable.count() > 0 and len(edits(pipe)) > 0
