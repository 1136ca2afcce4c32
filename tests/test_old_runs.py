"""Run folders written by persres before issue 20 (main f4ab991, tests/data/run-before-backbones) load,
sample, resume and export as they did then: the same images, the same loss after resuming, the same
residuals read back from the exported LoRA file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from persres.app.runstore import run_info
from persres.cli import main
from persres.formats.runs import read_run

DATA = Path(__file__).parent / "data" / "run-before-backbones"
SAMPLE = ["--base", "tiny-conv", "--prompt", "a V* dog", "--steps", "2", "--device", "cpu"]
# what a 3-step run resumed from the old run's last checkpoint logged at step 3, with f4ab991
STEP_3 = "3,1.2359580993652344,1.2106694211819076,0.05"


@pytest.fixture
def old(tmp_path: Path, conv_base: Path, photos: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out as the old runs were made in (see the data's README.md), and the working
    directory: their ``config.json`` names the base and the photos by these relative paths."""
    shutil.copytree(conv_base, tmp_path / "tiny-conv")  # save_tiny_pipeline is deterministic (seed 0)
    shutil.copytree(photos, tmp_path / "photos")
    for run in ("residuals-run", "lora-run"):
        shutil.copytree(DATA / run, tmp_path / run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_old_runs_load(old: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["info", "residuals-run"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["token"], info["class_word"], info["steps"]) == ("sks", "dog", 2)
    assert len(info["layers"]) == 4
    run = read_run("lora-run")
    assert run is not None and run.method == "lora" and run.result == Path("lora-run/result")
    listed = run_info(old / "residuals-run")  # the app's Runs page
    assert (listed.status, listed.steps_done, listed.steps) == ("finished", 2, 2)
    assert listed.last_loss == pytest.approx(1.1439318656921387, abs=0)


def test_old_runs_sample_the_same_images(old: Path) -> None:
    assert main(["sample", "--residuals", "residuals-run", "--sampler", "both", "--out", "res", *SAMPLE]) == 0
    assert main(["sample", "--residuals", "lora-run", "--out", "lora", *SAMPLE]) == 0
    drawn = {
        "residuals-normal": old / "res" / "0000-a-v-dog-normal.png",
        "residuals-lag": old / "res" / "0000-a-v-dog-lag.png",
        "lora-normal": old / "lora" / "0000-a-v-dog-normal.png",
    }
    for name, path in drawn.items():
        np.testing.assert_array_equal(pixels(path), pixels(DATA / "expected" / f"{name}.png"), err_msg=name)
    assert np.abs(pixels(drawn["residuals-normal"]) - pixels(drawn["lora-normal"])).max() > 10  # not trivial


def test_an_old_run_resumes(old: Path) -> None:
    train = ["train", "--base", "tiny-conv", "--images", "photos", "--out", "residuals-run", "--class-word",
             "dog", "--steps", "3", "--batch-size", "1", "--resolution", "16", "--lr", "0.05", "--device",
             "cpu", "--checkpoint-every", "1", "--resume"]  # fmt: skip
    before = (DATA / "residuals-run" / "logs" / "loss.csv").read_text().splitlines()
    assert main(train) == 0
    after = (old / "residuals-run" / "logs" / "loss.csv").read_text().splitlines()
    assert after[:3] == before and after[3].startswith(STEP_3 + ",")
    assert (old / "residuals-run" / "checkpoints" / "step-000003").is_dir()
    marker = json.loads((old / "residuals-run" / "persres-run.json").read_text())
    assert "checkpoints/step-000003" in marker["files"]


def test_an_old_run_exports_a_lora_file_that_reads_back(old: Path) -> None:
    assert main(["export", "residuals-run", "--format", "kohya", "--out", "concept.safetensors"]) == 0
    assert main(["import", "concept.safetensors", "--base", "tiny-conv", "--out", "back"]) == 0
    exported = load_file("back/residuals.safetensors")
    original = load_file("residuals-run/residuals.safetensors")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(exported[key], tensor, atol=0, rtol=0)
