"""No output path can be, hold or be inside an input path, for every command with an --out: refused with
one line and exit 2 before anything is written, the input byte-identical afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import bench_argv, train_argv

from persres.cli import main


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Own copies (a command that wrongly writes must not spoil the session's fixtures)."""
    root = tmp_path_factory.mktemp("inputs")
    base, own_photos = root / "base", root / "photos"
    shutil.copytree(conv_base, base)
    shutil.copytree(photos, own_photos)
    run = root / "run"
    assert main(train_argv(base, own_photos, run)) == 0
    lora = root / "lora" / "residuals.safetensors"  # a LoRA file that happens to bear the residual name
    assert main(["export", str(run), "--format", "kohya", "--out", str(lora)]) == 0
    results = root / "results"  # persres benchmark's --out
    results.mkdir()
    (results / "results.csv").write_text("concept,variant,clip_t\n")
    return {
        "BASE": base, "PHOTOS": own_photos, "RUN": run, "LORA": lora, "LORAS": lora.parent,
        "RESULTS": results, "PARENT": root,
    }  # fmt: skip


SAMPLE = ["sample", "--prompt", "a photo of a V* dog", "--steps", "2", "--height", "16", "--width", "16"]
CASES = {  # command line, the input it must leave alone
    "train --out is --images": (train_argv(Path("BASE"), Path("PHOTOS"), Path("PHOTOS")), "PHOTOS"),
    "train --out is --base": (train_argv(Path("BASE"), Path("PHOTOS"), Path("BASE")), "BASE"),
    "sample --out holds --residuals": (
        [*SAMPLE, "--base", "BASE", "--residuals", "RUN", "--out", "RUN"], "RUN"
    ),
    "sample --out inside --base": (
        [*SAMPLE, "--base", "BASE", "--residuals", "RUN", "--out", "BASE/samples"], "BASE"
    ),
    "merge --out inside --base": (
        ["merge", "--base", "BASE", "--residuals", "RUN", "--out", "BASE/m"], "BASE"
    ),
    "merge --out holds --residuals": (
        ["merge", "--base", "BASE", "--residuals", "RUN/residuals.safetensors", "--out", "PARENT"], "RUN"
    ),
    "export --out is the file": (
        ["export", "RUN/residuals.safetensors", "--format", "kohya", "--out", "RUN/residuals.safetensors",
         "--overwrite"], "RUN",
    ),  # fmt: skip
    "export --out is the run's file": (
        ["export", "RUN", "--format", "diffusers", "--out", "RUN/residuals.safetensors", "--overwrite"], "RUN"
    ),
    "import --out holds FILE": (
        ["import", "LORA", "--base", "BASE", "--out", "LORAS", "--overwrite"], "LORA"
    ),
    "import --out inside --base": (["import", "LORA", "--base", "BASE", "--out", "BASE/unet"], "BASE"),
    "evaluate --out is --images": (
        ["evaluate", "--images", "PHOTOS", "--references", "PHOTOS", "--out", "PHOTOS/photo0.png"], "PHOTOS"
    ),
    "report --out is its input": (["report", "RESULTS", "--out", "RESULTS/results.csv"], "RESULTS"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_output_that_overlaps_an_input_is_refused(
    case: str, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv, kept = CASES[case]
    argv = [named(arg, inputs) for arg in argv]
    refused(argv, inputs[kept], capsys)


def test_benchmark_out_inside_its_dataset_is_refused(
    dataset: Path, conv_base: Path, scorer_models: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    refused(bench_argv(dataset, conv_base, dataset / "bench", scorer_models), dataset, capsys)


def named(arg: str, inputs: dict[str, Path]) -> str:
    """"RUN/residuals.safetensors" -> that path in the fixture's folder."""
    head, _, rest = arg.partition("/")
    return str(inputs[head] / rest if rest else inputs[head]) if head in inputs else arg


def refused(argv: list[str], kept: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    before = snapshot(kept)
    out = Path(argv[argv.index("--out") + 1])
    existed = out.exists()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--out" in err
    assert snapshot(kept) == before
    assert out.exists() == existed
