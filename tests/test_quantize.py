"""`quantize_base` int8: the frozen denoiser's linear weights in 8 bits (torchao), the residuals in full
precision. It trains on the CPU, its residual gradients are close to the full-precision base's (measured
on tiny Flux and SD 2.x: relative error of the gradient vector 0.8% and 0.7%, cosine 0.99997), a resumed
run equals an uninterrupted one, and what cannot work on 8-bit weights is refused in one line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, train_argv
from PIL import Image
from test_release import assert_same_run

from persres import read_residual_file
from persres.backbones import backbone_of
from persres.cli import main
from persres.config import ResidualConfig, TrainConfig
from persres.core.conditioning import encode
from persres.core.pipeline import load_pipeline
from persres.core.quantize import is_quantized, quantize_denoiser
from persres.core.residuals import add_residuals, merge_residuals
from persres.errors import ConfigError
from persres.training.train import denoising_loss, train


def residual_gradients(base: Path, quantize: str) -> torch.Tensor:
    """Every residual factor's gradient of one denoising loss (fixed residuals, batch, noise and time)."""
    pipe = load_pipeline(str(base), quantize=quantize)  # type: ignore[arg-type]
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    config = ResidualConfig(rank=4, init="random")  # A non-zero: B gets a gradient too
    residuals = add_residuals(denoiser, config, generator=torch.Generator().manual_seed(0))
    text = encode(pipe, "a photo of a sks dog", torch.device("cpu"), 16)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scheduler = backbone.training_scheduler(pipe)
    noise = torch.Generator().manual_seed(2)
    denoising_loss(denoiser, pipe, scheduler, text, pixels, noise, backbone).backward()
    return torch.cat([p.grad.flatten() for r in residuals.values() for p in (r.A, r.B)])


@pytest.mark.parametrize("model", ["flux_base", "linear_base"])
def test_residual_gradients_on_the_int8_base_are_close_to_the_full_precision_ones(
    model: str, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue(model)
    full, int8 = residual_gradients(base, "no"), residual_gradients(base, "int8")
    assert not torch.equal(full, int8)  # the base really is quantized
    relative = ((int8 - full).norm() / full.norm()).item()
    assert relative < 0.03, relative  # measured 0.008 (Flux) and 0.007 (SD 2.x)
    assert torch.nn.functional.cosine_similarity(full, int8, dim=0) > 0.999


def test_every_linear_layer_of_the_denoiser_is_quantized_and_nothing_else(flux_base: Path) -> None:
    pipe = load_pipeline(str(flux_base), quantize="int8")
    denoiser = backbone_of(pipe).denoiser(pipe)
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m.weight) for m in linears)
    others = [
        p for m in denoiser.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)
    ]
    assert others and not any(is_quantized(p) for p in others)  # norms and embeddings as loaded
    assert not any(is_quantized(p) for p in pipe.vae.parameters())  # only the denoiser
    assert not any(is_quantized(p) for p in pipe.text_encoder_2.parameters())
    assert quantize_denoiser(denoiser, "int8") == 0  # a second call finds nothing left to do
    assert quantize_denoiser(torch.nn.Linear(4, 4), "no") == 0


def test_the_int8_weights_are_per_channel_8_bit() -> None:
    layer = torch.nn.Linear(64, 32)
    full = layer.weight.detach().clone()
    assert quantize_denoiser(torch.nn.Sequential(layer), "int8") == 1
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    got = layer(x)
    expected = torch.nn.functional.linear(x, full, layer.bias)
    # one scale per output row, 127 levels: the weight error is at most half a step of its row
    step = full.abs().amax(dim=1) / 127
    bound = (x.abs() @ (step[:, None] / 2 * torch.ones_like(full)).T) + 1e-5
    assert (got - expected).abs().le(bound).all()
    assert not torch.equal(got, expected)


def test_training_on_an_int8_flux_base_resumes_exactly_and_keeps_fp32_residuals(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    every = ("--quantize-base", "int8", "--checkpoint-every", "2")
    assert main(train_argv(flux_base, photos, tmp_path / "whole", "--steps", "4", *every)) == 0
    assert main(train_argv(flux_base, photos, tmp_path / "split", "--steps", "2", *every)) == 0
    assert main(train_argv(flux_base, photos, tmp_path / "split", "--steps", "4", "--resume", *every)) == 0
    assert_same_run(tmp_path / "split", tmp_path / "whole")
    tensors = read_residual_file(tmp_path / "whole").tensors
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_int8_training_with_bf16_and_checkpointing_on_flux(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    config = tiny_config(flux_base, photos, steps=2, quantize_base="int8")
    bf16 = replace(config, mixed_precision="bf16", gradient_checkpointing=True)
    result = train(bf16, tmp_path / "bf16", progress=False)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))


def test_a_run_started_on_the_full_base_does_not_resume_on_the_int8_one(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    config = tiny_config(conv_base, photos)
    assert replace(config, quantize_base="int8").resumable_with(config) == ["quantize_base"]


def test_bad_quantize_values_and_merging_into_int8_weights_are_refused(flux_base: Path, photos: Path) -> None:
    with pytest.raises(ConfigError, match="`quantize_base` must be one of no, int8"):
        TrainConfig(base="b", images="i", class_word="dog", quantize_base="int4")  # type: ignore[arg-type]
    pipe = load_pipeline(str(flux_base), quantize="int8")
    denoiser = backbone_of(pipe).denoiser(pipe)
    add_residuals(denoiser, ResidualConfig(rank=2))
    with pytest.raises(ConfigError, match="cannot be merged into a base with 8-bit weights"):
        merge_residuals(denoiser)


def test_the_cli_refuses_an_unknown_quantization(
    flux_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(train_argv(flux_base, photos, tmp_path / "run", "--quantize-base", "int4")) == 2
    assert (
        "--quantize-base: invalid choice: 'int4'" in capsys.readouterr().err
        and not (tmp_path / "run").exists()
    )


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_lora_and_textual_inversion_train_on_an_int8_base(
    method: str, conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ("--steps", "2", "--method", method)
    assert main(train_argv(conv_base, photos, tmp_path / "full", *flags)) == 0
    assert main(train_argv(conv_base, photos, tmp_path / "int8", *flags, "--quantize-base", "int8")) == 0
    assert "TorchaoLoraLinear" not in capsys.readouterr().err  # peft's merge warning: nothing merges here
    full, int8 = (
        sorted((tmp_path / "full" / "result").iterdir()),
        sorted((tmp_path / "int8" / "result").iterdir()),
    )
    assert [p.name for p in full] == [p.name for p in int8] and full


@pytest.mark.parametrize("method", ["dreambooth", "custom-diffusion", "perfusion"])
def test_methods_that_change_the_base_weights_are_refused_on_an_int8_base(
    method: str, conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(train_argv(conv_base, photos, out, "--method", method, "--quantize-base", "int8")) == 2
    err = capsys.readouterr().err
    assert f"--method {method} cannot train on a base with 8-bit weights (--quantize-base int8)" in err
    assert "residuals, lora, textual-inversion" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sampling_on_an_int8_base_is_close_to_the_full_base(
    flux_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(flux_base, photos, run, "--steps", "2", "--lr", "0.05")) == 0
    images = {}
    for quantize in ("no", "int8"):
        out = tmp_path / quantize
        argv = [
            "sample",
            "--base",
            str(flux_base),
            "--residuals",
            str(run),
            "--prompt",
            "a photo of a V* dog",
        ]
        argv += ["--out", str(out), "--steps", "2", "--quantize-base", quantize, "--sampler", "both"]
        assert main(argv) == 0
        images[quantize] = {p.name: np.asarray(Image.open(p), np.float32) for p in out.glob("*.png")}
    assert images["no"].keys() == images["int8"].keys() and images["no"]
    differences = [np.abs(images["int8"][name] - full).mean() for name, full in images["no"].items()]
    print("mean |int8 - full| per image, 0-255:", differences)
    assert max(differences) < 2 and min(differences) > 0  # 8-bit weights: close, not equal


def test_a_dreambooth_run_is_not_sampled_on_an_int8_base(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            train_argv(
                conv_base, photos, run, "--steps", "1", "--method", "dreambooth", "--prior-images", "0"
            )
        )
        == 0
    )
    argv = ["sample", "--base", str(conv_base), "--residuals", str(run), "--prompt", "a photo of a V* dog"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quantize-base", "int8"]) == 2
    assert "cannot be sampled on a base with 8-bit weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_int8_layer_keeps_no_full_precision_weight_for_its_backward_pass() -> None:
    """torchao's own linear would leave a cast (out, in) copy of each weight in the autograd graph."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 96))
    quantize_denoiser(layers, "int8")
    full = [layer.weight.dequantize(torch.float32) for layer in (layers[0], layers[2])]
    x = torch.randn(2, 96, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layers(x)
    assert saved and not {(128, 96), (96, 128)} & set(saved)  # only activations, no weight
    y.square().sum().backward()
    x_full = x.detach().clone().requires_grad_(True)
    plain = torch.nn.functional.linear(x_full, full[0], layers[0].bias)
    torch.nn.functional.linear(
        torch.nn.functional.gelu(plain), full[1], layers[2].bias
    ).square().sum().backward()
    torch.testing.assert_close(x.grad, x_full.grad, atol=1e-6, rtol=1e-5)  # the same gradient, recast
