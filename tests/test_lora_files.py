"""persres export / import: a run's residuals as kohya and diffusers LoRA files that plain diffusers loads
to the same U-Net and the same image, and such a file read back exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import diffusers_image, run_unet, train_argv, unet_inputs
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from persres.cli import main
from persres.core.residuals import find_proj_outs
from persres.formats.io import load_residuals, read_residual_file, write_residual_file

PROMPT = "a photo of a sks dog"


@pytest.fixture(scope="module")
def runs(conv_base: Path, linear_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained residuals run on each tiny base (SD 1.x Conv2d and SD 2.x Linear proj_out)."""
    out = {}
    for name, base in (("conv", conv_base), ("linear", linear_base)):
        run = tmp_path_factory.mktemp("runs") / name
        assert main(train_argv(base, photos, run, "--lr", "0.05", "--rank", "0.1")) == 0
        ranks = {b.shape[0] for _, b in read_residual_file(run).layers().values()}
        assert len(ranks) > 1  # several ranks in one file: each layer must load at scale 1
        out[name] = (base, run)
    return out


def export(run: Path, fmt: str, out: Path, *flags: str) -> int:
    return main(["export", str(run), "--format", fmt, "--out", str(out), *flags])


@pytest.mark.parametrize("arch", ["conv", "linear"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_plain_diffusers_loads_the_export_to_the_same_unet_and_image(
    arch: str, fmt: str, runs: dict, tmp_path: Path
) -> None:
    base, run = runs[arch]
    file = tmp_path / f"concept-{fmt}.safetensors"
    assert export(run, fmt, file) == 0

    ours = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    inputs = unet_inputs(ours.unet)
    plain = run_unet(ours.unet, inputs)
    load_residuals(ours.unet, run)
    personalized = run_unet(ours.unet, inputs)
    theirs = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    theirs.load_lora_weights(str(tmp_path), weight_name=file.name)  # diffusers' peft backend, no persres
    assert (personalized - plain).abs().max() > 1e-3  # the residuals change the U-Net
    torch.testing.assert_close(run_unet(theirs.unet, inputs), personalized, atol=1e-5, rtol=0)

    images = tmp_path / "images"
    sample = ["sample", "--base", str(base), "--residuals", str(run), "--out", str(images), "--steps", "2"]
    assert main([*sample, "--prompt", "a photo of a V* dog", "--device", "cpu"]) == 0
    [png] = images.glob("*.png")
    ours_image = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(ours_image - diffusers_image(theirs, PROMPT)).max() <= 1  # 1/255 per pixel


def test_kohya_file_keys_shapes_alphas_and_metadata(runs: dict, tmp_path: Path) -> None:
    for arch, (_, run) in runs.items():
        file = tmp_path / f"{arch}.safetensors"
        assert export(run, "kohya", file) == 0
        residual = read_residual_file(run)
        tensors = load_file(file)
        expected = {}
        for layer, (a, b) in residual.layers().items():
            name = "lora_unet_" + layer.replace(".", "_")
            tail = (1, 1) if arch == "conv" else ()
            expected[f"{name}.lora_down.weight"] = (*b.shape, *tail)
            expected[f"{name}.lora_up.weight"] = (*a.shape, *tail)
            expected[f"{name}.alpha"] = ()
            assert float(tensors[f"{name}.alpha"]) == b.shape[0]  # alpha = rank: scale 1
            assert torch.equal(tensors[f"{name}.lora_up.weight"].reshape(a.shape), a)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected  # LoRA tensors only
        assert "lora_unet_down_blocks_0_attentions_0_proj_out.alpha" in tensors
        assert all(v.dtype == torch.float32 for v in tensors.values())
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
        ranks = [b.shape[0] for _, b in residual.layers().values()]
        assert {k: v for k, v in metadata.items() if k.startswith("ss_")} == {
            "ss_base_model_version": "sd_v1" if arch == "conv" else "sd_v2",  # SD 2.x: Linear proj_out
            "ss_v2": str(arch != "conv"),
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": str(max(ranks)),
            "ss_output_name": "sks",
        }
        assert metadata["persres_token"] == "sks" and metadata["persres_class_word"] == "dog"
        assert metadata["persres_trigger"] == "sks dog"
        assert json.loads(metadata["persres_metadata"]) == residual.metadata


def test_export_import_info_round_trip_is_exact(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, run = runs["conv"]
    original = read_residual_file(run)
    assert main(["info", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    for fmt in ("kohya", "diffusers"):
        file = tmp_path / f"{fmt}.safetensors"
        assert export(run, fmt, file) == 0
        back = tmp_path / f"back-{fmt}"
        assert main(["import", str(file), "--base", str(base), "--out", str(back)]) == 0
        imported = read_residual_file(back)
        assert imported.tensors.keys() == original.tensors.keys()
        assert all(torch.equal(imported.tensors[k], original.tensors[k]) for k in original.tensors)
        assert imported.metadata == original.metadata
        capsys.readouterr()
        assert main(["info", str(back)]) == 0
        assert {**json.loads(capsys.readouterr().out), "file": info["file"]} == info


def test_a_v_prediction_sd2_base_is_marked_sd_v2_v(runs: dict, tmp_path: Path) -> None:
    base, run = runs["linear"]
    v_base = tmp_path / "v-base"
    shutil.copytree(base, v_base)
    config_file = v_base / "scheduler" / "scheduler_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"})
    )
    residual = read_residual_file(run)
    moved = write_residual_file(
        residual.layers(), tmp_path / "v.safetensors", {**residual.metadata, "base_model": str(v_base)}
    )
    assert export(moved, "kohya", tmp_path / "out.safetensors") == 0
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "sd_v2_v"


def test_scale_is_folded_into_the_up_factors(runs: dict, tmp_path: Path) -> None:
    _, run = runs["linear"]
    assert export(run, "diffusers", tmp_path / "one.safetensors") == 0
    assert export(run, "diffusers", tmp_path / "half.safetensors", "--scale", "0.5") == 0
    one, half = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "half.safetensors")
    for key in one:
        factor = 0.5 if key.endswith("lora_B.weight") else 1.0
        assert torch.equal(half[key], one[key] * factor)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1e39, 1e39, 101.0])
def test_the_library_refuses_a_non_finite_or_absurd_scale(runs: dict, tmp_path: Path, scale: float) -> None:
    """export --scale nan wrote non-finite factors; the CLI checks it when parsed, the library here."""
    from persres.errors import ConfigError
    from persres.formats.lora_files import export_lora

    _, run = runs["conv"]
    with pytest.raises(ConfigError, match=r"`scale` must be a finite number in \[-100, 100\]"):
        export_lora(run, "kohya", tmp_path / "lora.safetensors", scale)
    assert not any(tmp_path.iterdir())


def test_a_foreign_proj_out_lora_imports_with_its_alpha_and_needs_a_token(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, _ = runs["conv"]
    skeleton = StableDiffusionPipeline.from_pretrained(base).unet
    layer, module = next(iter(find_proj_outs(skeleton).items()))
    m = module.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, m, 1, 1, generator=g), torch.randn(m, 2, 1, 1, generator=g)
    name = "lora_unet_" + layer.replace(".", "_")
    file = tmp_path / "foreign.safetensors"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
        file,
    )
    out = tmp_path / "imported"
    assert main(["import", str(file), "--base", str(base), "--out", str(out)]) == 2
    assert "pass --token" in capsys.readouterr().err
    assert (
        main(
            [
                "import",
                str(file),
                "--base",
                str(base),
                "--out",
                str(out),
                "--token",
                "zwx",
                "--class-word",
                "cup",
            ]
        )
        == 0
    )
    imported = read_residual_file(out)
    a, b = imported.layers()[layer]
    assert torch.equal(a, up[:, :, 0, 0] * 0.5) and torch.equal(b, down[:, :, 0, 0])  # alpha / rank = 1 / 2
    others = [v for k, v in imported.layers().items() if k != layer]
    assert others and all(not x[0].any() for x in others)  # the layers it leaves out: no change
    assert imported.metadata["token"] == "zwx" and imported.metadata["class_word"] == "cup"


def test_bad_input_exits_2_and_names_it(
    runs: dict, conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, run = runs["conv"]
    stranger = tmp_path / "stranger.safetensors"
    save_file({"weight": torch.zeros(2)}, stranger)
    assert export(stranger, "kohya", tmp_path / "x.safetensors") == 2
    assert str(stranger) in capsys.readouterr().err
    assert export(run, "onnx", tmp_path / "x.safetensors") == 2
    assert "--format" in capsys.readouterr().err
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    assert export(run, "kohya", taken) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert taken.read_bytes() == b"keep me"
    assert export(run, "kohya", taken, "--overwrite") == 0

    lora_run = tmp_path / "lora-run"
    assert main(train_argv(conv_base, photos, lora_run, "--method", "lora", "--steps", "1")) == 0
    assert export(lora_run, "kohya", tmp_path / "y.safetensors") == 2
    assert "is a lora run" in capsys.readouterr().err
    peft_file = lora_run / "result" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "z"
    assert (
        main(
            [
                "import",
                str(peft_file),
                "--base",
                str(base),
                "--out",
                str(out),
                "--token",
                "a",
                "--class-word",
                "b",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not proj_out layers of this base" in err and "to_q" in err
    assert not out.exists() or not any(out.iterdir())
