"""`timestep_weighting` min-snr (Hang et al. 2023; kohya's ``--min_snr_gamma``): each image's loss times
min(SNR, 5) / SNR (epsilon target) or min(SNR, 5) / (SNR + 1) (v target), SNR = a / (1 - a) of the DDPM
schedule's cumulative alpha at the image's timestep. Checked against a hand computation on a tiny model,
with and without a mask; none leaves the loss bit for bit as it was; it trains and resumes exactly; on a
Flux base (flow matching, neither target) it is refused by name before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import assert_same_factors, interrupted_and_resumed, tiny_config, train_argv
from test_masks import CPU, step_inputs

from persres.backbones.unet import SD
from persres.cli import main
from persres.training.masks import file_mask
from persres.training.train import denoising_loss, train


def by_hand(scheduler: DDPMScheduler, steps: torch.Tensor) -> torch.Tensor:
    weights = []
    for t in steps.tolist():
        a = float(scheduler.alphas_cumprod[t])
        snr = a / (1 - a)
        below = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
        weights.append(min(snr, 5.0) / below)
    return torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_papers(prediction: str) -> None:
    scheduler = DDPMScheduler(prediction_type=prediction)
    steps = torch.tensor([0, 10, 100, 400, 999])
    got = SD.timestep_weights(scheduler, steps, "min-snr")
    assert got is not None and torch.allclose(got.double(), by_hand(scheduler, steps), rtol=1e-5)
    assert SD.timestep_weights(scheduler, steps, "none") is None
    if prediction == "epsilon":  # clipped at low noise, 1 where SNR is below gamma
        assert got[0] < 0.01 and got[-1] == 1.0


@pytest.mark.parametrize("masked", [False, True])
def test_the_weighted_loss_is_the_hand_computation(conv_base: Path, masked: bool) -> None:
    pipe, backbone, text, pixels = step_inputs(conv_base, seed=2)
    denoiser = backbone.denoiser(pipe)
    # a gentler schedule than the tiny model's: every timestep's SNR above gamma (weights < 1, all different)
    gentle = {"beta_schedule": "linear", "beta_start": 5e-5, "beta_end": 2e-4}
    scheduler = DDPMScheduler.from_config(backbone.training_scheduler(pipe).config, **gentle)
    pixel_mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    mask = file_mask(pixel_mask) if masked else None

    def loss(weighting: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return denoising_loss(
            denoiser, pipe, scheduler, text, pixels, generator, backbone, mask, timestep_weighting=weighting
        )

    generator = torch.Generator().manual_seed(7)  # the same draws, by hand
    latents = backbone.latents(pipe, backbone.posterior(pipe, pixels, CPU), generator)
    noisy, steps, target = backbone.noised(scheduler, latents, generator)
    with torch.no_grad():
        error = (backbone.predict(pipe, denoiser, noisy, steps, text).double() - target.double()) ** 2
    spatial = torch.ones_like(error[:, :1])
    if masked:
        spatial = torch.nn.functional.interpolate(pixel_mask.double(), size=error.shape[-2:], mode="area")
    per_image = by_hand(scheduler, steps).view(-1, 1, 1, 1)
    expected = float((error * spatial * per_image).mean() / spatial.mean())
    assert len(set(per_image.flatten().tolist())) == 2 and per_image.max() < 1  # two different weights
    assert loss("min-snr").item() == pytest.approx(expected, rel=1e-5, abs=0)
    plain = float((error * spatial).mean() / spatial.mean())
    assert loss("none").item() == pytest.approx(plain, rel=1e-5) and abs(expected - plain) > 1e-3


def test_min_snr_trains_and_resumes_exactly(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    config = tiny_config(conv_base, photos, steps=6, timestep_weighting="min-snr")
    whole = train(config, tmp_path / "whole", progress=False)
    plain = train(tiny_config(conv_base, photos, steps=6), tmp_path / "plain", progress=False)
    assert whole.final_loss != plain.final_loss
    assert_same_factors(interrupted_and_resumed(config, tmp_path / "split", 3), whole.residuals)


def test_min_snr_on_flux_is_refused_before_anything_is_written(
    flux_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(train_argv(flux_base, photos, out, "--timestep-weighting", "min-snr")) == 2
    err = capsys.readouterr().err
    assert "error: --timestep-weighting min-snr is not offered on Flux.1" in err and "use none" in err
    assert "Traceback" not in err and not out.exists()
