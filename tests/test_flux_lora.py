"""`--method lora` on Flux.1, on the tiny Flux base (``flux_base``) through the command line: adapters on
the layers diffusers' Flux DreamBooth-LoRA script adapts by default, a result that plain
``FluxPipeline.load_lora_weights`` loads onto exactly those layers and that gives persres' sampled image,
an exact resume, and the other peer methods still refused on Flux."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from helpers import train_argv
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from persres.backbones.flux import FLUX
from persres.cli import main
from persres.methods import METHODS
from persres.methods.lora import WEIGHTS
from persres.methods.protocol import RESULT

# train_dreambooth_lora_flux.py's target_modules without --lora_layers, on the tiny base's 2 double and 2
# single blocks: every one of the 12 in a double block, only attn.to_q/k/v in a single block (no to_out;
# proj_mlp and proj_out are not in the list)
DOUBLE = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")  # fmt: skip
EXPECTED = {f"transformer_blocks.{i}.{layer}" for i in range(2) for layer in DOUBLE} | {
    f"single_transformer_blocks.{i}.attn.to_{x}" for i in range(2) for x in "qkv"
}
PROMPT = "a photo of a sks dog"


def lora_argv(base: Path, photos: Path, run: Path, *flags: str) -> list[str]:
    return train_argv(base, photos, run, "--method", "lora", "--rank", "4", *flags)


@pytest.fixture(scope="module")
def lora_run(flux_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "flux-lora"
    assert main(lora_argv(flux_base, photos, run, "--steps", "2", "--lr", "0.05")) == 0
    return run


def plain_image(pipe: FluxPipeline) -> np.ndarray:
    """Plain diffusers' image of ``PROMPT`` with the seed, size and guidance ``persres sample`` uses (no
    guidance given: FluxPipeline's own default, 3.5)."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    return np.asarray(out, dtype=np.int16)


def test_the_flux_lora_targets_are_diffusers_defaults() -> None:
    assert set(FLUX.lora_targets) == set(DOUBLE) and len(FLUX.lora_targets) == 12
    assert METHODS["lora"].works_on_flux


def test_a_flux_lora_run_loads_in_plain_diffusers_on_exactly_its_layers_and_gives_persres_image(
    lora_run: Path, flux_base: Path, tmp_path: Path
) -> None:
    file = lora_run / RESULT / WEIGHTS
    tensors = load_file(str(file))
    assert set(tensors) == {f"transformer.{layer}.lora_{ab}.weight" for layer in EXPECTED for ab in "AB"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if ".lora_B." in k)  # trained
    pipe = FluxPipeline.from_pretrained(flux_base)
    pipe.load_lora_weights(str(lora_run / RESULT))  # diffusers alone, no persres code
    injected = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert set(injected) == EXPECTED
    assert all(list(m.r.values()) == [4] and list(m.scaling.values()) == [1.0] for m in injected.values())
    assert not any(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert not any(isinstance(m, LoraLayer) for m in pipe.text_encoder_2.modules())
    images = tmp_path / "ours"
    argv = ["sample", "--base", str(flux_base), "--residuals", str(lora_run), "--out", str(images),
            "--prompt", "a photo of a V* dog", "--steps", "2", "--height", "16", "--width", "16",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    [png] = images.glob("*.png")
    ours = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(ours - plain_image(pipe)).max() <= 1  # 1/255 per pixel
    assert np.abs(ours - plain_image(FluxPipeline.from_pretrained(flux_base))).max() > 1  # trained


def test_a_resumed_flux_lora_run_equals_an_uninterrupted_one(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    every = ("--checkpoint-every", "2", "--lr", "0.05")
    assert main(lora_argv(flux_base, photos, tmp_path / "whole", "--steps", "4", *every)) == 0
    assert main(lora_argv(flux_base, photos, tmp_path / "split", "--steps", "2", *every)) == 0
    assert main(lora_argv(flux_base, photos, tmp_path / "split", "--steps", "4", "--resume", *every)) == 0
    whole = load_file(str(tmp_path / "whole" / RESULT / WEIGHTS))
    split = load_file(str(tmp_path / "split" / RESULT / WEIGHTS))
    assert whole.keys() == split.keys() and len(whole) == 2 * len(EXPECTED)
    for key, tensor in whole.items():
        torch.testing.assert_close(split[key], tensor, atol=1e-6, rtol=0)


def test_only_lora_and_residuals_train_on_flux() -> None:
    """The others are refused by name through the command line (test_flux's refusal test walks them)."""
    on_flux = {name for name, info in METHODS.items() if info.works_on_flux}
    assert on_flux == {"residuals", "lora"}
    assert {"dreambooth", "custom-diffusion", "textual-inversion", "perfusion"} <= set(METHODS) - on_flux


def test_lora_refused_on_sdxl_names_the_families_it_trains_on() -> None:
    from persres.backbones.unet import SDXL
    from persres.errors import ConfigError
    from persres.methods import check_runs_on

    expected = r"`method` lora supports Stable Diffusion 1.x/2.x and Flux.1 here; on Stable Diffusion XL"
    with pytest.raises(ConfigError, match=expected + r" \(xl\) persres trains residuals "):
        check_runs_on("lora", SDXL, "xl")
    check_runs_on("lora", FLUX, "flux")  # nothing raised


def test_published_flux_dev_gets_342_lora_layers_of_2_801_664_parameters_per_rank() -> None:
    """On the meta device: 19 double blocks x 12 + 38 single blocks x 3 layers; at the recipe's rank 4,
    11,206,656 parameters (0.094% of the transformer's 11,901,408,320)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from persres.testing.reference_configs import FLUX_DEV_TRANSFORMER

    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(FLUX_DEV_TRANSFORMER)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(FLUX.lora_targets)))
    injected = {name: m for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    assert len(injected) == 19 * 12 + 38 * 3 == 342
    per_rank = sum(m.in_features + m.out_features for m in injected.values())
    assert per_rank == 2_801_664
    assert sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" in n) == 4 * per_rank


def test_flux_lora_trains_checkpointed_with_released_text_encoders_and_in_bf16(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    """The same factors with gradient checkpointing and the text encoders released (1e-6); bf16 trains."""
    plain, lean = tmp_path / "plain", tmp_path / "lean"
    assert main(lora_argv(flux_base, photos, plain, "--steps", "2", "--lr", "0.05")) == 0
    flags = ("--gradient-checkpointing", "--release-text-encoders")
    assert main(lora_argv(flux_base, photos, lean, "--steps", "2", "--lr", "0.05", *flags)) == 0
    one, other = load_file(str(plain / RESULT / WEIGHTS)), load_file(str(lean / RESULT / WEIGHTS))
    assert one.keys() == other.keys()
    for key, tensor in one.items():
        torch.testing.assert_close(other[key], tensor, atol=1e-6, rtol=0)
    bf16 = tmp_path / "bf16"
    assert main(lora_argv(flux_base, photos, bf16, "--steps", "1", "--mixed-precision", "bf16")) == 0
    saved = load_file(str(bf16 / RESULT / WEIGHTS))
    assert saved.keys() == one.keys() and all(torch.isfinite(t).all() for t in saved.values())
