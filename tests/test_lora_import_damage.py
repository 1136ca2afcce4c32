"""persres import refuses what sample would refuse, and every damaged LoRA file, with one line naming the
file, exit 2, nothing written: the generic safetensors damages, LoRA metadata damages, non-finite or
absurd factors, and a file made for another architecture (SD 1.x Conv2d vs SD 2.x Linear proj_out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from damage import HUGE_INT, safetensors_damages
from diffusers import UNet2DConditionModel
from helpers import randomize_residuals
from safetensors import safe_open
from safetensors.torch import save_file

from persres.cli import main
from persres.config import ResidualConfig
from persres.core.residuals import add_residuals
from persres.formats.io import save_residuals, write_residual_file
from persres.formats.lora_files import ADAPTER_METADATA, PERSRES_METADATA, export_lora


def residual_file(base: Path, out: Path) -> Path:
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    add_residuals(unet, ResidualConfig(rank=2))
    randomize_residuals(unet)
    return save_residuals(unet, out, base_model=str(base), token="sks", class_word="dog")


@pytest.fixture(scope="module")
def exports(conv_base: Path, linear_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A persres export in each format for each tiny base: "conv kohya", "linear diffusers", ..."""
    root = tmp_path_factory.mktemp("exports")
    files = {}
    for arch, base in (("conv", conv_base), ("linear", linear_base)):
        residuals = residual_file(base, root / f"{arch}.safetensors")
        for fmt in ("kohya", "diffusers"):
            files[f"{arch} {fmt}"] = export_lora(residuals, fmt, root / f"{arch}-{fmt}.safetensors")
    return files


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def kohya_damages(good: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    tensors, metadata = read(good)
    alpha = next(key for key in tensors if key.endswith(".alpha"))
    name = alpha.removesuffix(".alpha")
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    return {
        "alpha a vector": ({**tensors, alpha: torch.tensor([1.0, 2.0])}, metadata),
        "alpha nan": ({**tensors, alpha: torch.tensor(float("nan"))}, metadata),
        "alpha inf": ({**tensors, alpha: torch.tensor(float("inf"))}, metadata),
        "rank 0": (
            {**tensors, f"{name}.lora_down.weight": down[:0], f"{name}.lora_up.weight": up[:, :0]}, metadata
        ),
        "factor nan": ({**tensors, f"{name}.lora_up.weight": up * float("nan")}, metadata),
        "factors 1e30": (
            {**tensors, f"{name}.lora_up.weight": up * 1e30, f"{name}.lora_down.weight": down * 1e30},
            metadata,
        ),
        "persres metadata not json": (tensors, {**metadata, PERSRES_METADATA: "{not json"}),
        "persres metadata a list": (tensors, {**metadata, PERSRES_METADATA: "[1, 2]"}),
        "persres metadata huge integer": (tensors, {**metadata, PERSRES_METADATA: HUGE_INT}),
        "persres metadata numbers": (tensors, {**metadata, PERSRES_METADATA: '{"format": 1}'}),
    }  # fmt: skip


def diffusers_damages(good: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    tensors, metadata = read(good)
    config = json.loads(metadata[ADAPTER_METADATA])

    def adapter(raw: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return tensors, {**metadata, ADAPTER_METADATA: raw}

    layer = next(iter(config["unet.rank_pattern"]))
    return {
        "adapter metadata not json": adapter("{not json"),
        "adapter metadata a list": adapter("[1, 2]"),
        "adapter r 0": adapter(json.dumps({**config, "unet.r": 0, "unet.rank_pattern": {}})),
        "adapter rank 0 for a layer": adapter(json.dumps({**config, "unet.rank_pattern": {layer: 0}})),
        "adapter string alpha": adapter(json.dumps({**config, "unet.alpha_pattern": {layer: "two"}})),
        "adapter huge integers": adapter('{"unet.r": ' + HUGE_INT + "}"),
        "adapter rank pattern a list": adapter(json.dumps({**config, "unet.rank_pattern": [1]})),
        "adapter alpha huge": adapter(json.dumps({**config, "unet.alpha_pattern": {layer: 1e308 * 10}})),
    }


def damaged_files(exports: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Every damage of the SD 1.x exports, each written as its own file."""
    files = {}
    for fmt in ("kohya", "diffusers"):
        good = exports[f"conv {fmt}"]
        for kind, raw in safetensors_damages(good.read_bytes()).items():
            files[f"{fmt}: {kind}"] = raw
        specific = kohya_damages(good) if fmt == "kohya" else diffusers_damages(good)
        for kind, (tensors, metadata) in specific.items():
            path = folder / "made.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
            files[f"{fmt}: {kind}"] = path.read_bytes()
    written = {}
    for number, (kind, raw) in enumerate(sorted(files.items())):
        path = folder / f"damaged-{number}.safetensors"
        path.write_bytes(raw)
        written[kind] = path
    return written


def test_every_damaged_lora_is_refused_on_import(
    exports: dict[str, Path], conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    accepted = []
    for kind, path in damaged_files(exports, tmp_path).items():
        out = tmp_path / "imported"
        code = main(["import", str(path), "--base", str(conv_base), "--out", str(out)])
        err = capsys.readouterr().err
        ok = code == 2 and len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err
        if not ok or out.exists():
            accepted.append(f"{kind}: exit {code}, {err[-300:]!r}")
    assert accepted == []


@pytest.mark.parametrize(("made_for", "base"), [("conv", "linear"), ("linear", "conv")])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_lora_for_another_architecture_is_refused_on_import(
    exports: dict[str, Path], made_for: str, base: str, fmt: str, request: pytest.FixtureRequest,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    file, base_path = exports[f"{made_for} {fmt}"], request.getfixturevalue(f"{base}_base")
    out = tmp_path / "imported"
    assert main(["import", str(file), "--base", str(base_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(file) in err and "was made for" in err
    assert not out.exists()
    assert main(["import", str(file), "--base", str(request.getfixturevalue(f"{made_for}_base")),
                 "--out", str(out)]) == 0  # fmt: skip


def test_huge_factors_are_refused_by_every_command_that_loads_them(
    conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite factors whose product is absurd sampled an all-black image with exit 0."""
    good = residual_file(conv_base, tmp_path / "good.safetensors")
    _, metadata = read(good)
    tensors, _ = read(good)
    layers = {key.rpartition(".")[0] for key in tensors}
    factors = {layer: (tensors[f"{layer}.A"] * 1e15, tensors[f"{layer}.B"] * 1e15) for layer in layers}
    huge = write_residual_file(factors, tmp_path / "huge" / "residuals.safetensors", metadata)
    commands = {
        "sample": ["sample", "--base", str(conv_base), "--residuals", str(huge), "--prompt", "a V* dog",
                   "--steps", "2", "--height", "16", "--width", "16", "--out", str(tmp_path / "images")],
        "merge": ["merge", "--base", str(conv_base), "--residuals", str(huge),
                  "--out", str(tmp_path / "merged")],
        "export": ["export", str(huge), "--format", "kohya", "--out", str(tmp_path / "lora.safetensors")],
    }  # fmt: skip
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and str(huge) in err and "more than 10000" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "huge"]


@pytest.mark.parametrize("name", ["folder", "folder.safetensors"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_export_out_naming_a_folder_is_one_line(
    exports: dict[str, Path], name: str, flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = exports["conv kohya"].with_name("conv.safetensors")
    folder = tmp_path / name
    (folder / "inside").mkdir(parents=True)
    assert main(["export", str(source), "--format", "kohya", "--out", str(folder), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"persres export: error: --out {folder} is a folder; pass the name of the file to write\n"
    assert [p.name for p in folder.iterdir()] == ["inside"]
