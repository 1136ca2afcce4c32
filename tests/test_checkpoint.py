"""Checkpoints read back on --resume: a damaged or hand-edited file is named, with what to do."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, train_argv
from safetensors.torch import load_file, save_file

from persres.cli import main
from persres.errors import InputError
from persres.training.train import train

STEP2 = Path("checkpoints") / "step-000002"


@pytest.fixture(scope="module")
def finished(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("checkpoint") / "run"
    train(
        tiny_config(conv_base, photos, steps=2, batch_size=1, checkpoint_every=1, lr=1e-3),
        out,
        progress=False,
        device="cpu",
    )
    return out


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def edit_tensors(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def edit_state(file: Path, change: Callable[[dict], None]) -> None:
    state = json.loads(file.read_text())
    change(state)
    file.write_text(json.dumps(state))


def resume_error(run: Path, conv_base: Path, photos: Path) -> str:
    with pytest.raises(InputError) as caught:
        train(
            replace(
                tiny_config(conv_base, photos, steps=2, batch_size=1, checkpoint_every=1, lr=1e-3), steps=3
            ),
            run,
            resume=True,
            progress=False,
            device="cpu",
        )
    return str(caught.value)


DAMAGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "state-not-json": ("state.json", lambda f: f.write_text('{"step": 2,')),
    "state-other-step": ("state.json", lambda f: edit_state(f, lambda s: s.update(step=7))),
    "state-unknown-setting": ("state.json", lambda f: edit_state(f, lambda s: s["config"].update(size=3))),
    "state-bad-setting": ("state.json", lambda f: edit_state(f, lambda s: s["config"].update(residual=4))),
    "optimizer-not-safetensors": ("optimizer.safetensors", lambda f: f.write_bytes(b"\x00" * 40)),
    "optimizer-tensor-missing": (
        "optimizer.safetensors",
        lambda f: edit_tensors(f, lambda t: t.pop(sorted(k for k in t if k.endswith(".exp_avg"))[0])),
    ),
    "optimizer-wrong-shape": (
        "optimizer.safetensors",
        lambda f: edit_tensors(f, lambda t: t.update({k: t[k][:1] for k in t if k.endswith(".exp_avg_sq")})),
    ),
    "rng-not-safetensors": ("rng-0.safetensors", lambda f: f.write_bytes(b"garbage")),
    "rng-not-a-state": (
        "rng-0.safetensors",
        lambda f: edit_tensors(f, lambda t: t.update(state=t["state"][:9])),
    ),
    "residuals-not-safetensors": ("residuals.safetensors", lambda f: f.write_bytes(b"{}")),
    "residuals-wrong-shape": (
        "residuals.safetensors",
        lambda f: save_file({k: v[:1] for k, v in load_file(str(f)).items()}, str(f), {"format": "x"}),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_file_is_named_with_what_to_do(
    run: Path, conv_base: Path, photos: Path, damage: str
) -> None:
    name, change = DAMAGES[damage]
    change(run / STEP2 / name)
    message = resume_error(run, conv_base, photos)
    assert str(run / STEP2 / name) in message
    assert (
        f"delete {run / STEP2} to resume from the checkpoint before it (from step 0 if there is none), "
        "or start again with `overwrite`" in message
    )


def test_a_checkpoint_without_state_json_is_not_skipped(run: Path, conv_base: Path, photos: Path) -> None:
    (run / STEP2 / "state.json").unlink()
    assert f"{run / STEP2 / 'state.json'} is damaged or was edited (missing)" in resume_error(
        run, conv_base, photos
    )


def test_a_step_folder_that_is_no_checkpoint_is_named(run: Path, conv_base: Path, photos: Path) -> None:
    shutil.copytree(run / STEP2, run / "checkpoints" / "step-abc")  # a hand-made copy
    (run / "checkpoints" / "notes.txt").write_text("mine")  # not step-*: left alone
    message = resume_error(run, conv_base, photos)
    assert (
        f"{run / 'checkpoints' / 'step-abc'} is not a checkpoint (persres names them step-NNNNNN)" in message
    )


def test_deleting_the_damaged_checkpoint_resumes_from_the_one_before(
    run: Path, conv_base: Path, photos: Path
) -> None:
    (run / STEP2 / "optimizer.safetensors").write_bytes(b"garbage")
    resume_error(run, conv_base, photos)
    shutil.rmtree(run / STEP2)
    steps: list[int] = []
    train(
        replace(tiny_config(conv_base, photos, steps=2, batch_size=1, checkpoint_every=1, lr=1e-3), steps=3),
        run,
        resume=True,
        progress=False,
        device="cpu",
        callback=lambda step, _: steps.append(step),
    )
    assert steps == [2, 3]


def test_the_cli_prints_one_line_and_exits_2(
    run: Path, conv_base: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / STEP2 / "rng-0.safetensors").write_bytes(b"garbage")
    argv = train_argv(conv_base, photos, run, "--steps", "3", "--checkpoint-every", "1", "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rng-0.safetensors is damaged" in err


def test_checkpoints_are_usable_residual_files(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--checkpoint-every", "1")) == 0
    checkpoint = run / "checkpoints" / "step-000001"
    argv = [
        "sample",
        "--base",
        str(conv_base),
        "--residuals",
        str(checkpoint / "residuals.safetensors"),
        "--out",
        str(tmp_path / "img"),
        "--prompt",
        "a V* dog",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    sidecar = json.loads(next((tmp_path / "img").glob("*.json")).read_text())
    assert sidecar["expanded_prompt"] == "a sks dog"  # the checkpoint knows its identifier
    capsys.readouterr()
    assert main(["info", str(run)]) == 0  # a run folder stands for its residuals.safetensors
    assert json.loads(capsys.readouterr().out)["steps"] == 2
