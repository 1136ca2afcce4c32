"""Flux.1: the published transformer's 57 residual targets and their parameter count, the backbone's parts
(packing, flow matching, the transformer call) against diffusers' own, and on a tiny Flux pipeline loaded
through from_pretrained (``flux_base`` in conftest): train, resume, validation, sample, info, and the
refusals (peer methods, residual files of another family), LAG through the pipeline, merge, and both
LoRA exports (kohya, diffusers) loaded by FluxPipeline.load_lora_weights and imported back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from helpers import train_argv
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import T5Tokenizer

from persres.backbones import (
    backbone_for_base,
    backbone_of,
    backbone_of_denoiser,
    backbone_of_record,
    rank_default_for,
)
from persres.backbones.flux import (
    DEFAULT_RANK,
    FLUX,
    TEXT_LENGTH,
    TRAINING_GUIDANCE,
    bfl_name,
    image_ids,
    pack,
    unpack,
)
from persres.cli import main
from persres.config import ResidualConfig, SampleSettings
from persres.core.pipeline import load_pipeline
from persres.core.residuals import add_residuals, count_parameters, find_proj_outs, residuals_disabled
from persres.errors import ModelError
from persres.formats.concepts import load_concepts
from persres.formats.io import architecture, read_residual_file, write_residual_file
from persres.inference.sampling import sample
from persres.methods import DEFAULT_METHOD, METHODS
from persres.methods.recipes import Overrides, train_config
from persres.testing.reference_configs import FLUX_DEV_TRANSFORMER
from persres.testing.tiny import FLUX_SCHEDULER, save_tiny_flux_pipeline, tiny_flux_pipeline

FLUX_DEV_PARAMETERS = 11_901_408_320  # FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER), counted on meta
PER_RANK = 19 * (3072 + 3072) + 38 * (15360 + 3072)  # parameters per unit of rank on the 57 layers
PAPER_SHARE = 1_239_040 / 859_520_964  # SD 1.5: residual parameters / U-Net parameters


def meta_flux(**changes: object) -> torch.nn.Module:
    with init_empty_weights():
        return FluxTransformer2DModel.from_config({**FLUX_DEV_TRANSFORMER, **changes})


def sample_argv(base: Path, run: Path, out: Path, *flags: str) -> list[str]:
    return ["sample", "--base", str(base), "--residuals", str(run), "--out", str(out), "--prompt",
            "a photo of a V* dog", "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu",
            *flags]  # fmt: skip


@pytest.fixture(scope="module")
def flux_run(flux_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps on the tiny Flux base through the command line, with validation images every step."""
    run = tmp_path_factory.mktemp("runs") / "flux"
    argv = train_argv(flux_base, photos, run, "--lr", "0.05", "--validation-prompt", "a photo of a V* dog",
                      "--validation-every", "1")  # fmt: skip
    assert main(argv) == 0
    return run


def test_published_flux_dev_transformer_has_57_targets_of_its_two_kinds() -> None:
    transformer = meta_flux()
    assert sum(p.numel() for p in transformer.parameters()) == FLUX_DEV_PARAMETERS
    assert backbone_of_denoiser(transformer) is FLUX
    targets = FLUX.residual_targets(transformer)
    shapes = {path: tuple(layer.weight.shape) for path, layer in targets.items()}
    double = {f"transformer_blocks.{i}.attn.to_out.0": (3072, 3072) for i in range(19)}
    single = {f"single_transformer_blocks.{i}.proj_out": (3072, 15360) for i in range(38)}
    assert shapes == {**double, **single}  # the text stream's to_add_out and the model's own proj_out: not
    assert bfl_name("transformer_blocks.18.attn.to_out.0") == "double_blocks.18.img_attn.proj"
    assert bfl_name("single_transformer_blocks.37.proj_out") == "single_blocks.37.linear2"
    names = FLUX.kohya_names(list(targets))
    assert names["transformer_blocks.0.attn.to_out.0"] == "lora_unet_double_blocks_0_img_attn_proj"
    assert names["single_transformer_blocks.5.proj_out"] == "lora_unet_single_blocks_5_linear2"
    assert len(set(names.values())) == 57 and FLUX.kohya_model_version(False, None) == "flux1"


@pytest.mark.parametrize(
    ("rank", "per_layer", "expected"),
    [(DEFAULT_RANK, 21, 17_160_192), (0.05, 154, 125_841_408), (16, 16, 13_074_432)],
)
def test_published_flux_dev_residual_count_is_the_sum_of_r_in_plus_out(
    rank: float | int, per_layer: int, expected: int
) -> None:
    transformer = meta_flux()
    residuals = add_residuals(transformer, ResidualConfig(rank=rank))
    assert len(residuals) == 57 and {w.rank for w in residuals.values()} == {per_layer}
    total = sum(w.rank * (w.base.in_features + w.base.out_features) for w in residuals.values())
    assert count_parameters(residuals) == total == expected == per_layer * PER_RANK
    if rank == DEFAULT_RANK:  # the default keeps the paper's share of the base, 0.144%
        assert abs(expected / FLUX_DEV_PARAMETERS / PAPER_SHARE - 1) < 0.001


def test_persres_info_counts_a_flux_dev_file_at_the_default_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The whole 57-layer file (68 MB of zeros) at the default rank; at r = 0.05 m it would be 503 MB, so
    that rank is checked on a file of the published width and one block of each kind (below)."""
    transformer = meta_flux()
    targets = find_proj_outs(transformer)
    r = DEFAULT_RANK
    factors = {p: (torch.zeros(layer.out_features, r), torch.zeros(r, layer.in_features))
               for p, layer in targets.items()}  # fmt: skip
    header = {"token": "sks", "class_word": "dog", "architecture": architecture(transformer)}
    file = write_residual_file(factors, tmp_path / "flux.safetensors", header)
    assert main(["info", str(file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["layers"]) == 57 and info["total_parameters"] == 17_160_192
    assert info["architecture"] == "Flux.1 (transformer, text width 4096, guidance-distilled)"


def test_persres_info_counts_r_005_m_per_block_as_the_api(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    reduced = meta_flux(num_layers=1, num_single_layers=1)  # published width, one block of each kind
    residuals = add_residuals(reduced, ResidualConfig(rank=0.05))
    factors = {p: (torch.zeros(w.A.shape), torch.zeros(w.B.shape)) for p, w in residuals.items()}
    header = {"token": "sks", "class_word": "dog"}
    file = write_residual_file(factors, tmp_path / "flux-1-1.safetensors", header)
    assert main(["info", str(file)]) == 0
    layers = {layer["path"]: layer["parameters"] for layer in json.loads(capsys.readouterr().out)["layers"]}
    double = layers["transformer_blocks.0.attn.to_out.0"]
    single = layers["single_transformer_blocks.0.proj_out"]
    assert (double, single) == (154 * 6144, 154 * 18432)
    full = add_residuals(meta_flux(), ResidualConfig(rank=0.05))
    assert 19 * double + 38 * single == count_parameters(full) == 125_841_408


def test_the_flux_backbone_is_picked_by_pipeline_folder_denoiser_and_record(flux_base: Path) -> None:
    pipe = tiny_flux_pipeline()
    assert backbone_of(pipe) is FLUX and FLUX.pipeline_class is FluxPipeline
    assert backbone_for_base(str(flux_base)) is FLUX
    assert next(FLUX.skeleton(str(flux_base)).parameters()).is_meta
    assert FLUX.default_resolution == 1024 and FLUX.rank_default == DEFAULT_RANK
    towers = FLUX.text_towers(pipe)
    assert [type(encoder).__name__ for _, encoder in towers] == ["CLIPTextModel", "T5EncoderModel"]
    record = FLUX.architecture(pipe.transformer, find_proj_outs(pipe.transformer))
    assert record == {"denoiser": "FluxTransformer2DModel", "proj_out": "linear", "joint_attention_dim": 32,
                      "guidance_embeds": True}  # fmt: skip
    assert backbone_of_record(record) is FLUX
    pipe.register_to_config(_name_or_path="my/flux")
    pipe.transformer = None
    with pytest.raises(ModelError, match="my/flux is a FluxPipeline without a Flux transformer") as caught:
        backbone_of(pipe)
    assert "\n" not in str(caught.value)


def test_tiny_flux_loads_through_from_pretrained_with_its_own_scheduler(flux_base: Path) -> None:
    pipe = load_pipeline(str(flux_base))
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.tokenizer_2, T5Tokenizer)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # sampled as shipped, not with DDIM
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert pipe.tokenizer_2("a photo of a sks dog").input_ids[-1] == pipe.tokenizer_2.eos_token_id
    assert len(pipe.tokenizer_2.tokenize("a photo of a sks dog")) == 6  # one token per word
    residuals = add_residuals(pipe.transformer)
    assert sorted(residuals) == [
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.1.proj_out",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.1.attn.to_out.0",
    ]
    assert all(isinstance(w.base, torch.nn.Linear) for w in residuals.values())


def test_packing_and_image_ids_are_the_pipelines() -> None:
    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pack(latents)
    assert packed.shape == (2, 12, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6), atol=0, rtol=0)
    assert torch.equal(unpack(packed, 8, 6), latents)
    torch.testing.assert_close(unpack(packed, 8, 6), FluxPipeline._unpack_latents(packed, 16, 12, 2))
    expected = FluxPipeline._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32)
    assert torch.equal(image_ids(4, 3, torch.device("cpu"), torch.float32), expected)


def test_flux_noise_is_flow_matching_at_the_schedulers_training_sigmas() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)  # Flux.1-dev's: dynamic shifting
    latents = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    noisy, steps, target = FLUX.noised(scheduler, latents, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    index = (torch.rand(3, generator=g) * 1000).long()
    sigma = ((1000 - index) / 1000).view(3, 1, 1, 1)  # the unshifted training table of a dynamic scheduler
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(target, noise - latents)
    torch.testing.assert_close(steps, sigma.flatten() * 1000)


def test_flux_predict_is_the_pipelines_transformer_call(flux_base: Path) -> None:
    pipe = load_pipeline(str(flux_base))
    cpu = torch.device("cpu")
    condition = FLUX.encode(pipe, "a photo of a sks dog", cpu, 16)
    hidden, pooled, text_ids = pipe.encode_prompt("a photo of a sks dog", device=cpu,
                                                  max_sequence_length=512)  # fmt: skip
    assert condition.hidden.shape == (1, TEXT_LENGTH, 32) and torch.equal(condition.hidden, hidden)
    assert torch.equal(condition.pooled, pooled) and torch.equal(condition.text_ids, text_ids)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    steps = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ours = FLUX.predict(pipe, pipe.transformer, latents, steps, condition)

        def theirs(guidance: float) -> torch.Tensor:  # as FluxPipeline.__call__ calls its transformer
            out = pipe.transformer(
                hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 8, 8),
                timestep=steps / 1000,
                guidance=torch.full([2], guidance),
                pooled_projections=pooled.expand(2, -1),
                encoder_hidden_states=hidden.expand(2, -1, -1),
                txt_ids=text_ids,
                img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, cpu, torch.float32),
                return_dict=False,
            )[0]
            return FluxPipeline._unpack_latents(out, 16, 16, pipe.vae_scale_factor)

        torch.testing.assert_close(ours, theirs(TRAINING_GUIDANCE), atol=1e-6, rtol=1e-6)
        assert (ours - theirs(3.5)).abs().max() > 1e-4  # the guidance embedding is fed, and it counts


def test_training_on_flux_writes_the_loss_log_validation_and_a_flux_residual_file(
    flux_run: Path, flux_base: Path, capsys: pytest.CaptureFixture
) -> None:
    with open(flux_run / "logs" / "loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(np.isfinite(float(r["loss"])) for r in rows)
    for step in (1, 2):
        assert list((flux_run / "validation" / f"step-00000{step}").glob("*.png"))
    saved = read_residual_file(flux_run / "residuals.safetensors")
    record = {"denoiser": "FluxTransformer2DModel", "proj_out": "linear", "joint_attention_dim": 32,
              "guidance_embeds": True}  # fmt: skip
    assert saved.json_field("architecture") == record
    assert {a.shape[1] for a, _ in saved.layers().values()} == {DEFAULT_RANK}  # the Flux default rank
    assert json.loads((flux_run / "config.json").read_text())["residual"]["rank"] == DEFAULT_RANK
    assert any(a.abs().sum() > 0 for a, _ in saved.layers().values())
    assert main(["info", str(flux_run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "Flux.1 (transformer, text width 32, guidance-distilled)"
    assert info["total_parameters"] == 21 * (2 * (32 + 32) + 2 * (160 + 32)) and len(info["layers"]) == 4


def test_a_resumed_flux_run_equals_an_uninterrupted_one(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    every = ("--checkpoint-every", "2", "--rank", "4")
    assert main(train_argv(flux_base, photos, tmp_path / "whole", "--steps", "4", *every)) == 0
    assert main(train_argv(flux_base, photos, tmp_path / "split", "--steps", "2", *every)) == 0
    assert main(train_argv(flux_base, photos, tmp_path / "split", "--steps", "4", "--resume", *every)) == 0
    whole, split = read_residual_file(tmp_path / "whole"), read_residual_file(tmp_path / "split")
    assert whole.tensors.keys() == split.tensors.keys()
    for key, tensor in whole.tensors.items():
        torch.testing.assert_close(split.tensors[key], tensor, atol=1e-6, rtol=0)


def test_methods_that_do_not_run_on_flux_are_refused_by_name(
    flux_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    refused = [name for name, info in METHODS.items() if not info.works_on_flux]
    assert refused and "residuals" not in refused
    for method in refused:
        out = tmp_path / method
        assert main(train_argv(flux_base, photos, out, "--method", method, "--steps", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert f"--method {method} supports Stable Diffusion 1.x/2.x here; on Flux.1" in err
        assert "--method residuals" in err and len(err.splitlines()) == 1 and not out.exists()


def test_sampling_a_flux_run_normal_and_lag(
    flux_run: Path, flux_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "ours"
    assert main(sample_argv(flux_base, flux_run, images)) == 0
    [png] = images.glob("*.png")
    ours = np.asarray(Image.open(png), dtype=np.int16)
    plain = FluxPipeline.from_pretrained(flux_base)
    plain.set_progress_bar_config(disable=True)
    base = plain("a photo of a sks dog", num_inference_steps=2, height=16, width=16,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert ours.shape == (16, 16, 3) and np.abs(ours - np.asarray(base, dtype=np.int16)).max() > 1
    [sidecar] = images.glob("*.json")
    assert json.loads(sidecar.read_text())["scheduler"] == "FlowMatchEulerDiscrete"
    assert json.loads(sidecar.read_text())["guidance"] == 3.5  # Flux.1-dev's, no `guidance` given
    both = tmp_path / "both"
    assert main(sample_argv(flux_base, flux_run, both, "--sampler", "both", "--save-masks")) == 0
    kinds = sorted(json.loads(s.read_text())["sampler"] for s in both.glob("*.json"))
    assert kinds == ["lag", "normal"]
    [normal_png] = [p for p in both.glob("*.png") if p.stem.endswith("normal")]
    assert np.array_equal(np.asarray(Image.open(normal_png), dtype=np.int16), ours)  # same noise, same image


def test_lag_on_flux_masks_0_and_1_give_base_and_normal(
    flux_run: Path, flux_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the pipeline, from the T5 positions of V* and the class word: every block's mask 0 draws
    the base model's image and every mask 1 the normal one; the real masks are binary, per block."""
    pipe = load_pipeline(str(flux_base))
    concepts = load_concepts(pipe.transformer, [flux_run])
    settings = SampleSettings(steps=2, height=16, width=16)
    prompts = ["a photo of a V* dog on the beach"]
    [normal, lag] = sample(pipe, prompts, concepts, settings, "both", save_masks=True, progress=False)
    blocks = {block for masks in lag.masks.values() for block in masks}
    assert len(blocks) == 4  # 2 double + 2 single blocks
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for masks in lag.masks.values() for m in masks.values())
    with residuals_disabled(pipe.transformer):
        [base] = sample(pipe, prompts, concepts, settings, "normal", progress=False)
    pixels = {name: np.asarray(s.image, dtype=np.int16) for name, s in (("base", base), ("normal", normal))}
    assert np.abs(pixels["normal"] - pixels["base"]).max() > 1
    for value, expected in ((0.0, "base"), (1.0, "normal")):
        fill = lambda score, batch, v=value: torch.full((batch, *score.shape[1:]), v)  # noqa: E731
        monkeypatch.setattr("persres.core.lag.binarize", fill)
        [image] = sample(pipe, prompts, concepts, settings, "lag", progress=False)
        assert np.abs(np.asarray(image.image, dtype=np.int16) - pixels[expected]).max() <= 1, expected


def test_sd_and_flux_residual_files_are_refused_by_each_other_naming_both(
    flux_run: Path,
    flux_base: Path,
    conv_base: Path,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    sd1_run = tmp_path / "sd1"
    assert main(train_argv(conv_base, photos, sd1_run, "--steps", "1")) == 0
    capsys.readouterr()
    for base, run, made, this in (
        (flux_base, sd1_run, "SD 1.x", "Flux.1"),
        (conv_base, flux_run, "Flux.1", "SD 1.x"),
    ):
        out = tmp_path / f"out-{made}"
        assert main(sample_argv(base, run, out)) == 2
        err = capsys.readouterr().err.strip()
        assert f"made for {made} (" in err and f"this base model is {this} (" in err
        assert len(err.splitlines()) == 1 and not out.exists()


def test_residuals_take_the_flux_default_rank_from_every_front_end(flux_base: Path, conv_base: Path) -> None:
    assert rank_default_for(str(flux_base)) == FLUX.rank_default == DEFAULT_RANK
    assert rank_default_for(str(conv_base)) == 0.05 and rank_default_for("no/such-base") == 0.05
    made = train_config(DEFAULT_METHOD, str(flux_base), "photos", "dog")
    assert made.residual.rank == DEFAULT_RANK
    given = train_config(DEFAULT_METHOD, str(flux_base), "photos", "dog", Overrides(rank=0.05))
    assert given.residual.rank == 0.05  # a given rank, fraction or not, is kept


def test_gradient_checkpointing_and_bf16_train_on_flux(flux_base: Path, photos: Path, tmp_path: Path) -> None:
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert main(train_argv(flux_base, photos, plain, "--steps", "1")) == 0
    assert main(train_argv(flux_base, photos, checkpointed, "--steps", "1", "--gradient-checkpointing")) == 0
    one, other = read_residual_file(plain), read_residual_file(checkpointed)
    for key, tensor in one.tensors.items():  # recomputing activations changes nothing
        torch.testing.assert_close(other.tensors[key], tensor, atol=1e-6, rtol=0)
    bf16 = train_argv(flux_base, photos, tmp_path / "bf16", "--steps", "1", "--mixed-precision", "bf16")
    assert main(bf16) == 0
    with open(tmp_path / "bf16" / "logs" / "loss.csv") as handle:
        assert all(np.isfinite(float(row["loss"])) for row in csv.DictReader(handle))


def test_a_flux_dev_file_is_refused_on_a_base_without_guidance_naming_both(
    flux_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    schnell = save_tiny_flux_pipeline(tmp_path / "schnell", guidance=False)
    assert main(sample_argv(schnell, flux_run, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "made for Flux.1 (transformer, text width 32, guidance-distilled)" in err
    assert "this base model is Flux.1 (transformer, text width 32, no guidance embedding)" in err


def residual_image(flux_base: Path, run: Path, tmp_path: Path) -> np.ndarray:
    """The residual model's image, sampled by persres (normal sampling), as integers."""
    assert main(sample_argv(flux_base, run, tmp_path / "ours")) == 0
    [png] = (tmp_path / "ours").glob("*.png")
    return np.asarray(Image.open(png), dtype=np.int16)


def image(pipe: FluxPipeline) -> np.ndarray:
    """Plain diffusers' image of the prompt ``sample_argv`` samples, with its seed and size, and
    FluxPipeline's own guidance (3.5), which persres takes when none is given."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a sks dog", num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    return np.asarray(out, dtype=np.int16)


def test_flux_merge_kohya_export_and_import_give_the_residual_model_back(
    flux_run: Path, flux_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Not built for Flux on purpose: what the protocol gives already (merge, kohya names), measured."""
    ours = residual_image(flux_base, flux_run, tmp_path)
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(flux_base), "--residuals", str(flux_run), "--out", str(merged)]) == 0
    assert np.abs(ours - image(FluxPipeline.from_pretrained(merged))).max() <= 1
    file = tmp_path / "flux-kohya.safetensors"
    assert main(["export", str(flux_run), "--format", "kohya", "--out", str(file)]) == 0
    with safe_open(str(file), "pt") as handle:
        keys = {key.split(".")[0] for key in handle.keys()}
        assert handle.metadata()["ss_base_model_version"] == "flux1"
    assert keys == {f"lora_unet_double_blocks_{i}_img_attn_proj" for i in range(2)} | {
        f"lora_unet_single_blocks_{i}_linear2" for i in range(2)
    }
    pipe = FluxPipeline.from_pretrained(flux_base)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    assert np.abs(ours - image(pipe)).max() <= 1  # 1/255 per pixel
    back = tmp_path / "back"
    assert main(["import", str(file), "--base", str(flux_base), "--out", str(back)]) == 0
    original, imported = read_residual_file(flux_run), read_residual_file(back)
    assert imported.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(imported.tensors[k], original.tensors[k]) for k in original.tensors)


def test_flux_diffusers_export_loads_every_layer_in_load_lora_weights_and_imports_back(
    flux_run: Path, flux_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``transformer.`` keys in peft's naming with the adapter metadata: diffusers' Flux loader injects a
    LoRA into every residual layer, at scale 1, with the file's factors, and nothing else."""
    file = tmp_path / "flux-diffusers.safetensors"
    assert main(["export", str(flux_run), "--format", "diffusers", "--out", str(file)]) == 0
    with safe_open(str(file), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    layers = sorted(read_residual_file(flux_run).layers())
    assert len(layers) == 4 and sorted(config["transformer.target_modules"]) == layers
    assert set(tensors) == {f"transformer.{layer}.lora_{ab}.weight" for layer in layers for ab in "AB"}
    pipe = FluxPipeline.from_pretrained(flux_base)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    injected = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(injected) == layers  # one LoRA per residual layer: none dropped, none elsewhere
    assert all(list(m.scaling.values()) == [1.0] for m in injected.values())
    assert not any(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    [adapter] = pipe.transformer.peft_config  # diffusers names it (default_0)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert {f"transformer.{key}" for key in loaded} == set(tensors)  # every tensor used, as it is
    assert all(torch.equal(loaded[key], tensors[f"transformer.{key}"]) for key in loaded)
    assert np.abs(residual_image(flux_base, flux_run, tmp_path) - image(pipe)).max() <= 1  # 1/255
    back = tmp_path / "back"
    assert main(["import", str(file), "--base", str(flux_base), "--out", str(back)]) == 0
    original, imported = read_residual_file(flux_run), read_residual_file(back)
    assert imported.tensors.keys() == original.tensors.keys() and imported.metadata == original.metadata
    assert all(torch.equal(imported.tensors[k], original.tensors[k]) for k in original.tensors)
    unet_keys = tmp_path / "unet-keys.safetensors"  # the U-Net's prefix: diffusers' Flux loader ignores it
    save_file({key.replace("transformer.", "unet.", 1): t for key, t in tensors.items()}, str(unet_keys))
    capsys.readouterr()
    assert main(["import", str(unet_keys), "--base", str(flux_base), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a Flux.1 LoRA in kohya (lora_unet_...) or diffusers (transformer....)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "no" / "residuals.safetensors").exists()


def test_flux_diffusers_export_keeps_each_layers_rank_and_the_scale(flux_base: Path, tmp_path: Path) -> None:
    """Ranks 3, 7, 21 and 1 on the four layers and `scale` 0.5: diffusers' Flux loader gives each layer its
    own rank at scale 1, and its change is exactly 0.5 A B."""
    pipe = FluxPipeline.from_pretrained(flux_base)
    generator = torch.Generator().manual_seed(0)
    layers = find_proj_outs(pipe.transformer)
    factors = {
        name: (torch.randn(m.weight.shape[0], r, generator=generator), torch.randn(r, m.weight.shape[1],
                                                                                   generator=generator))
        for (name, m), r in zip(layers.items(), (3, 7, 21, 1), strict=True)
    }  # fmt: skip
    metadata = {"base_model": str(flux_base), "architecture": architecture(pipe.transformer), "token": "sks",
                "class_word": "dog"}  # fmt: skip
    residuals = write_residual_file(factors, tmp_path / "run" / "residuals.safetensors", metadata)
    file = tmp_path / "half.safetensors"
    argv = ["export", str(residuals), "--format", "diffusers", "--out", str(file), "--scale", "0.5"]
    assert main(argv) == 0
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    [adapter] = pipe.transformer.peft_config
    injected = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    ranks = {name: down.shape[0] for name, (_, down) in factors.items()}
    assert {name: m.r[adapter] for name, m in injected.items()} == ranks  # every layer, its own rank
    assert all(m.scaling[adapter] == 1.0 for m in injected.values())
    for name, module in injected.items():
        up, down = factors[name]
        assert torch.equal(module.get_delta_weight(adapter), 0.5 * up @ down)
