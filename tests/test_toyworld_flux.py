"""The toy Flux base's training: a stopped and resumed run is the same run, weight for weight; the export
is a FluxPipeline folder that plain diffusers loads and samples, and that persres loads and trains on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from helpers import train_argv
from safetensors.torch import load_file

from persres import load_concepts, read_residual_file
from persres.backbones import backbone_of
from persres.backbones.flux import FLUX
from persres.cli import main
from persres.core.pipeline import load_pipeline
from persres.inference.sampling import SampleSettings, sample
from persres.toymodels import find_toy_model
from persres.toyworld.model import LATENT_CHANNELS
from persres.toyworld.train_flux_base import FluxTrainConfig, flux_vae, train_flux

TINY = FluxTrainConfig(steps=4, batch=2, checkpoint_every=2, warmup=2)
PARTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{part}:{k}": v for part in PARTS for k, v in load_file(folder / part).items()}


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return flux_vae(find_toy_model(), TINY.seed)


@pytest.fixture(scope="module")
def toy_flux(vae: AutoencoderKL, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four steps of the script's training, uninterrupted: the exported folder."""
    root = tmp_path_factory.mktemp("toy-flux")
    train_flux(TINY, root / "work", vae, root / "out")
    return root / "out"


def test_resumed_flux_training_equals_uninterrupted(
    vae: AutoencoderKL, toy_flux: Path, tmp_path: Path
) -> None:
    train_flux(replace(TINY, steps=2), tmp_path, vae, tmp_path / "stopped")
    train_flux(TINY, tmp_path, vae, tmp_path / "resumed")  # resumes at step 2
    full, resumed, stopped = (
        _weights(toy_flux),
        _weights(tmp_path / "resumed"),
        _weights(tmp_path / "stopped"),
    )
    assert any(not torch.equal(full[k], stopped[k]) for k in full)  # the last two steps did something
    assert set(full) == set(resumed)
    assert all(torch.equal(resumed[k], full[k]) for k in full)


def test_export_loads_with_plain_diffusers_and_draws(toy_flux: Path) -> None:
    pipe = FluxPipeline.from_pretrained(toy_flux)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 4 * LATENT_CHANNELS == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.vae.config.shift_factor is not None and pipe.vae.config.scaling_factor > 0
    assert pipe.tokenizer_2.model_max_length == TINY.text_length  # the length it was trained at
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a photo of a blue dotted car on the beach",
        negative_prompt="",
        true_cfg_scale=4.0,  # true classifier-free guidance: the model has no guidance embedding
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=pipe.tokenizer_2.model_max_length,
        generator=generator,
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and 0 <= image.min() and image.max() <= 1


def test_persres_loads_the_export_as_flux_and_trains_on_it(
    toy_flux: Path, photos: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(toy_flux))
    assert backbone_of(pipe) is FLUX
    assert len(FLUX.residual_targets(pipe.transformer)) == TINY.double_blocks + TINY.single_blocks
    out = tmp_path / "run"
    assert main(train_argv(toy_flux, photos, out, "--resolution", "32")) == 0
    assert (out / "residuals.safetensors").is_file()
    # persres reads its prompts at the T5 length it was trained at (its tokenizer's), not Flux.1's 512
    text_length = TINY.text_length
    assert FLUX.encode(pipe, "a photo of a dog", torch.device("cpu"), 32).hidden.shape[1] == text_length
    calls: list[dict[str, object]] = []
    original = type(pipe).__call__

    def spy(self: FluxPipeline, *args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    [concept] = load_concepts(pipe.transformer, [read_residual_file(out / "residuals.safetensors")])
    settings = SampleSettings(steps=2, height=32, width=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe), "__call__", spy)
        images = sample(pipe, ["a photo of a V* dog"], [concept], settings, "both", progress=False)
    assert [s.sampler for s in images] == ["normal", "lag"]
    assert [call["max_sequence_length"] for call in calls] == [text_length, text_length]


def test_the_shipped_flux_base_loads_with_plain_diffusers_and_draws_the_asked_background() -> None:
    """models/toyworld-flux (its card: the judge reads the background of 93% of full captions right)."""
    from persres.toymodels import TOY_FLUX_BASE, TOY_ORACLE
    from persres.toyworld.judge import load_judge, read_images

    pipe = FluxPipeline.from_pretrained(find_toy_model(TOY_FLUX_BASE))
    places = ("on the beach", "in the snow", "in the forest", "in the city")
    images = []
    for seed, place in enumerate(places):
        call = {"negative_prompt": "", "true_cfg_scale": 7.5, "height": 32, "width": 32, "output_type": "np"}
        generator = torch.Generator().manual_seed(seed)
        prompt = f"a photo of a dog {place}"
        out = pipe(prompt, max_sequence_length=32, num_inference_steps=12, generator=generator, **call)
        images.append((out.images[0] * 255).round().astype("uint8"))
    reads = read_images(load_judge(find_toy_model(TOY_ORACLE)), images)
    expected = ["beach", "snow", "forest", "city"]
    assert sum(read["background"] == want for read, want in zip(reads, expected, strict=True)) >= 3, reads


def test_the_toy_experiment_samples_base_normal_and_lag_on_the_flux_base(
    toy_flux: Path, photos: Path, tmp_path: Path
) -> None:
    """The toy world's comparison code (``sample_variants``: the demo's report, the benchmarks) on Flux."""
    from persres.toyworld.experiment import ToySettings, sample_variants
    from persres.toyworld.prompts import concept_prompts

    run = tmp_path / "run"
    assert main(train_argv(toy_flux, photos, run, "--resolution", "32", "--steps", "2")) == 0
    pipe = load_pipeline(str(toy_flux))
    prompts = concept_prompts(("dog", "red", "striped"), per_kind=1)[:2]
    settings = replace(ToySettings(images_per_prompt=1, sample_steps=2).sampling(), guidance=4.0)
    variants = sample_variants(pipe, run / "residuals.safetensors", prompts, settings)
    assert {name: len(samples) for name, samples in variants.items()} == {"base": 2, "normal": 2, "lag": 2}
    assert all(s.image.size == (32, 32) and s.guidance == 4.0 for v in variants.values() for s in v)
