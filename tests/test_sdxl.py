"""Stable Diffusion XL: the published U-Net's residual count, and on a tiny SDXL pipeline loaded through
from_pretrained (``xl_base`` in conftest): train, sample normal and LAG, merge, the kohya export, the
benchmark, wrong-architecture refusals. Resuming an SDXL run is checked in test_train.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import bench_argv, train_argv
from PIL import Image
from safetensors.torch import load_file

from persres.backbones.unet import cross_attentions
from persres.cli import main
from persres.config import SampleSettings
from persres.core.lag import LagState, binarize, block_score, localized
from persres.core.pipeline import load_pipeline
from persres.core.residuals import add_residuals, count_parameters, residuals_disabled
from persres.formats.concepts import load_concepts
from persres.formats.io import read_residual_file
from persres.formats.lora_files import kohya_names
from persres.inference.sampling import sample
from persres.testing.reference_configs import SDXL_UNET

SETTINGS = SampleSettings(steps=2, guidance=7.5, num_images=1, seed=0, height=16, width=16)


@pytest.fixture(scope="module")
def xl_run(xl_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "xl"
    assert main(train_argv(xl_base, photos, run, "--lr", "0.05", "--rank", "0.25")) == 0
    return run


def xl_unet_inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    return latents, torch.tensor([10, 500]), text, pooled, time_ids


def run_xl_unet(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    latents, steps, text, pooled, time_ids = inputs
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(latents, steps, encoder_hidden_states=text, added_cond_kwargs=added).sample


def pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png), dtype=np.int16)


def test_published_sdxl_unet_has_11_proj_out_and_the_counted_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        residuals = add_residuals(unet)
    assert len(residuals) == 11
    widths = {path: w.base.in_features for path, w in residuals.items()}
    assert sorted(set(widths.values())) == [640, 1280]
    assert {w.rank for w in residuals.values()} == {32, 64}  # 0.05 x 640 and 0.05 x 1280
    expected = sum(2 * m * round(0.05 * m) for m in widths.values())  # A (m x r) and B (r x m) per block
    assert count_parameters(residuals) == expected
    # persres info reads the count from a file of that layout (factors written as zeros, off the meta device)
    from persres.formats.io import write_residual_file

    factors = {
        p: (torch.zeros(m, round(0.05 * m)), torch.zeros(round(0.05 * m), m)) for p, m in widths.items()
    }
    file = write_residual_file(factors, tmp_path / "sdxl.safetensors", {"token": "sks", "class_word": "dog"})
    assert main(["info", str(file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == expected and len(info["layers"]) == 11


def test_kohya_names_of_the_published_sdxl_unet_are_kohyas_sgm_names() -> None:
    with torch.device("meta"):
        layers = list(add_residuals(UNet2DConditionModel(**SDXL_UNET)))
    names = kohya_names(layers, xl=True)
    expected = {
        "input_blocks_4_1",
        "input_blocks_5_1",
        "input_blocks_7_1",
        "input_blocks_8_1",
        "middle_block_1",
    }
    expected |= {f"output_blocks_{i}_1" for i in range(6)}
    assert set(names.values()) == {f"lora_unet_{n}_proj_out" for n in expected}
    assert names["down_blocks.1.attentions.0.proj_out"] == "lora_unet_input_blocks_4_1_proj_out"
    assert names["up_blocks.1.attentions.2.proj_out"] == "lora_unet_output_blocks_5_1_proj_out"


def test_tiny_sdxl_loads_as_sdxl_with_its_two_text_towers(xl_base: Path) -> None:
    pipe = load_pipeline(str(xl_base))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    residuals = add_residuals(pipe.unet)
    assert len(residuals) == 6 and all(isinstance(w.base, torch.nn.Linear) for w in residuals.values())


def test_lag_on_sdxl_masks_0_and_1_give_base_and_normal(
    xl_run: Path, xl_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(str(xl_base))
    concepts = load_concepts(pipe.unet, [xl_run])
    prompts = ["a photo of a V* dog on the beach"]
    [normal, lag] = sample(pipe, prompts, concepts, SETTINGS, "both", save_masks=True, progress=False)
    for blocks in lag.masks.values():  # one mask per block, also for blocks of 2 transformer layers
        assert len(blocks) == 6
        assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in blocks.values())
    inputs = xl_unet_inputs(pipe.unet)
    with residuals_disabled(pipe.unet):
        base_out = run_xl_unet(pipe.unet, inputs)
    full_out = run_xl_unet(pipe.unet, inputs)
    assert (full_out - base_out).abs().max() > 1e-4
    columns = torch.zeros(1, 1, 7)
    columns[0, 0, 2] = 1
    for value, expected in ((0.0, base_out), (1.0, full_out)):
        fill = lambda score, batch, v=value: torch.full((batch, *score.shape[1:]), v)  # noqa: E731
        monkeypatch.setattr("persres.core.lag.binarize", fill)
        with localized(pipe.unet, LagState(columns)):
            torch.testing.assert_close(run_xl_unet(pipe.unet, inputs), expected, atol=1e-5, rtol=1e-5)


def test_a_block_of_several_layers_sums_their_scores(xl_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = load_pipeline(str(xl_base))
    blocks = [p.removesuffix(".proj_out") for p in add_residuals(pipe.unet)]
    assert {len(cross_attentions(pipe.unet.get_submodule(b), b)) for b in blocks} == {2}  # as SDXL's deeper
    scores: list[torch.Tensor] = []
    summed: list[torch.Tensor] = []

    def score_spy(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        scores.append(block_score(probs, columns))
        return scores[-1]

    def binarize_spy(score: torch.Tensor, batch: int) -> torch.Tensor:
        summed.append(score)
        return binarize(score, batch)

    monkeypatch.setattr("persres.core.lag.block_score", score_spy)
    monkeypatch.setattr("persres.core.lag.binarize", binarize_spy)
    columns = torch.zeros(1, 1, 7)
    columns[0, 0, 2] = 1
    with localized(pipe.unet, LagState(columns)):
        run_xl_unet(pipe.unet, xl_unet_inputs(pipe.unet))
    assert len(scores) == 12 and len(summed) == 6  # two layers per block, one mask per block
    for k, total in enumerate(summed):  # each block's mask is made from the sum of its layers' scores
        torch.testing.assert_close(total, scores[2 * k] + scores[2 * k + 1])
        assert not torch.equal(scores[2 * k], scores[2 * k + 1])  # both layers count


def test_sdxl_merge_and_kohya_export_load_in_plain_diffusers(
    xl_run: Path, xl_base: Path, tmp_path: Path
) -> None:
    images = tmp_path / "ours"
    sample_argv = ["sample", "--base", str(xl_base), "--residuals", str(xl_run), "--out", str(images)]
    assert main([*sample_argv, "--prompt", "a photo of a V* dog", "--steps", "2", "--device", "cpu",
                 "--height", "16", "--width", "16"]) == 0  # fmt: skip
    [png] = images.glob("*.png")
    ours = pixels(png)

    def plain(pipe: StableDiffusionXLPipeline) -> np.ndarray:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of a sks dog", num_inference_steps=2, guidance_scale=7.5, height=16, width=16,
                   generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        return np.asarray(out, dtype=np.int16)

    base_image = plain(StableDiffusionXLPipeline.from_pretrained(xl_base))
    assert np.abs(ours - base_image).max() > 1  # the residuals change the image

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(xl_base), "--residuals", str(xl_run), "--out", str(merged)]) == 0
    assert np.abs(ours - plain(StableDiffusionXLPipeline.from_pretrained(merged))).max() <= 1

    file = tmp_path / "xl-kohya.safetensors"
    assert main(["export", str(xl_run), "--format", "kohya", "--out", str(file)]) == 0
    keys = {k.split(".")[0].removeprefix("lora_unet_") for k in load_file(file)}
    sgm = {
        "input_blocks_4_1",
        "input_blocks_5_1",
        "middle_block_1",
        *(f"output_blocks_{i}_1" for i in range(3)),
    }
    assert keys == {f"{name}_proj_out" for name in sgm}  # kohya's SDXL (sgm) naming
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_base)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    assert np.abs(ours - plain(pipe)).max() <= 1  # 1/255 per pixel

    back = tmp_path / "back"
    assert main(["import", str(file), "--base", str(xl_base), "--out", str(back)]) == 0
    original, imported = read_residual_file(xl_run), read_residual_file(back)
    assert all(torch.equal(imported.tensors[k], original.tensors[k]) for k in original.tensors)


def test_sd1_and_sdxl_files_are_refused_by_each_other_naming_both(
    xl_run: Path, xl_base: Path, conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sd1_run = tmp_path / "sd1"
    assert main(train_argv(conv_base, photos, sd1_run, "--steps", "1")) == 0
    capsys.readouterr()
    for base, run, made, this in (
        (xl_base, sd1_run, "SD 1.x", "SDXL"),
        (conv_base, xl_run, "SDXL", "SD 1.x"),
    ):
        out = tmp_path / f"out-{made}"
        argv = [
            "sample",
            "--base",
            str(base),
            "--residuals",
            str(run),
            "--out",
            str(out),
            "--prompt",
            "a V* dog",
        ]
        assert main([*argv, "--steps", "1", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"made for {made} (" in err and f"this base model is {this} (" in err
        assert not out.exists()


def test_the_peer_methods_are_refused_on_sdxl(xl_base: Path, photos: Path, tmp_path: Path, capsys) -> None:
    assert main(train_argv(xl_base, photos, tmp_path / "run", "--method", "lora", "--steps", "1")) == 2
    assert "--method lora supports Stable Diffusion 1.x/2.x" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_report_and_suggest_token_on_sdxl(
    xl_base: Path,
    dataset: Path,
    scorer_models: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "bench"
    assert main(bench_argv(dataset, xl_base, out, scorer_models)) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["sampler"] for r in rows} == {"normal", "lag", "auto"} and len(
        {r["concept"] for r in rows}
    ) == 2
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    capsys.readouterr()
    assert main(["suggest-token", "--base", str(xl_base), "--top", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 1
