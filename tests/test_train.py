"""Training: the loss falls, resume is exact, divergence and clobbering are caught."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import interrupt_at, tiny_config, train_argv
from PIL import Image

from persres import ResidualConfig, add_residuals, read_residual_file
from persres.cli import main
from persres.config import TrainConfig
from persres.core.conditioning import Conditioning, encode
from persres.core.pipeline import load_pipeline
from persres.core.residuals import residual_parameters
from persres.errors import ConfigError, InputError, OutputExistsError, TrainingDivergedError
from persres.training.data import ConceptImages
from persres.training.train import denoising_loss, train


def factors(path: Path) -> dict[str, torch.Tensor]:
    return read_residual_file(path).tensors


def test_steps_lower_the_loss_on_a_fixed_batch(base: Path, photos: Path) -> None:
    pipe = load_pipeline(str(base))
    add_residuals(pipe.unet, ResidualConfig(rank=0.25))
    images = ConceptImages.from_folder(photos, 16)
    pixels = images.batch(4, torch.Generator().manual_seed(0), 0.85, True)
    text = encode(pipe, "a photo of a sks dog", torch.device("cpu"), 16)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(residual_parameters(pipe.unet).values(), lr=1e-2)

    def loss() -> torch.Tensor:  # same batch, same noise, same timesteps every time
        return denoising_loss(pipe.unet, pipe, scheduler, text, pixels, torch.Generator().manual_seed(1))

    first = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * first


def test_run_writes_residuals_config_and_checkpoints(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    config = tiny_config(conv_base, photos)
    losses: list[float] = []
    result = train(config, tmp_path / "run", progress=False, callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 6 and result.final_loss == losses[-1]
    saved = read_residual_file(result.residuals)
    assert saved.metadata["token"] == "sks" and saved.metadata["class_word"] == "dog"
    assert saved.metadata["base_model"] == str(conv_base)
    assert TrainConfig.from_dict(json.loads(saved.metadata["train_config"])) == config
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["class_word"] == "dog" and written["steps"] == 6
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]  # the two newest
    assert any(a.abs().sum() > 0 for k, a in saved.tensors.items() if k.endswith(".A"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["conv_base", "xl_base"])  # SD 1.x, and SDXL's added conditioning
def test_interrupted_and_resumed_equals_uninterrupted(
    model: str, photos: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = tiny_config(request.getfixturevalue(model), photos)
    whole = train(config, tmp_path / "whole", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "split", progress=False, callback=interrupt_at(5))
    assert not (tmp_path / "split" / "residuals.safetensors").exists()
    with pytest.raises(OutputExistsError, match="`resume`"):
        train(config, tmp_path / "split", progress=False)
    steps: list[int] = []
    resumed = train(
        config, tmp_path / "split", resume=True, progress=False, callback=lambda s, _: steps.append(s)
    )
    assert steps == [5, 6]  # continued from the checkpoint at step 4
    expected, got = factors(whole.residuals), factors(resumed.residuals)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_resume_with_other_settings_is_refused(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    train(tiny_config(conv_base, photos, steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"settings differ .*\['batch_size'\]"):
        train(
            tiny_config(conv_base, photos, steps=4, batch_size=1),
            tmp_path / "run",
            resume=True,
            progress=False,
        )
    longer = train(tiny_config(conv_base, photos, steps=4), tmp_path / "run", resume=True, progress=False)
    assert read_residual_file(longer.residuals).metadata["step"] == "4"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    conv_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    calls: list[int] = []

    def nan_on_third_step(*args: object) -> torch.Tensor:
        loss = denoising_loss(*args)  # type: ignore[arg-type]
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr("persres.training.train.denoising_loss", nan_on_third_step)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3.*step-000002 \(step 2\)"):
        train(tiny_config(conv_base, photos), out, progress=False)
    assert not (out / "residuals.safetensors").exists()
    good = factors(out / "checkpoints" / "step-000002" / "residuals.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_overwrite_replaces_only_the_run(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    train(tiny_config(conv_base, photos, steps=2), out, progress=False)
    with pytest.raises(ConfigError, match="contradict"):
        train(tiny_config(conv_base, photos), out, resume=True, overwrite=True, progress=False)
    result = train(
        tiny_config(conv_base, photos, steps=3, checkpoint_every=5), out, overwrite=True, progress=False
    )
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert read_residual_file(result.residuals).metadata["step"] == "3"


def test_the_marker_lists_what_the_run_wrote_and_overwrite_keeps_the_rest(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = train_argv(conv_base, photos, out, "--validation-prompt", "a V* dog", "--validation-every", "1")
    assert main(argv) == 0
    capsys.readouterr()
    listed = json.loads((out / "persres-run.json").read_text())["files"]
    assert sorted(listed) == [
        "checkpoints/step-000002", "config.json", "logs/loss.csv", "logs/loss.png", "residuals.safetensors",
        "validation/step-000001", "validation/step-000002",
    ]  # fmt: skip
    assert "result" not in listed and all((out / name).exists() for name in listed)
    for mine in (out / "result" / "keep.txt", out / "validation" / "my-photo.png"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("mine")
        before = snapshot(out)
        assert main(argv + ["--overwrite"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and mine.parent.name in err and "did not write" in err
        assert snapshot(out) == before
        shutil.rmtree(mine.parent) if mine.parent.name == "result" else mine.unlink()
    assert main(argv + ["--overwrite"]) == 0


def test_gradient_checkpointing_gives_the_same_result(
    linear_base: Path, photos: Path, tmp_path: Path
) -> None:
    plain = train(tiny_config(linear_base, photos, steps=2), tmp_path / "a", progress=False)
    saved = train(
        tiny_config(linear_base, photos, steps=2, gradient_checkpointing=True), tmp_path / "b", progress=False
    )
    for key, value in factors(plain.residuals).items():
        torch.testing.assert_close(factors(saved.residuals)[key], value, atol=1e-6, rtol=0)


def test_bf16_mixed_precision_keeps_fp32_factors(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    result = train(
        tiny_config(conv_base, photos, steps=2, mixed_precision="bf16"), tmp_path / "run", progress=False
    )
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert all(t.dtype == torch.float32 for t in factors(result.residuals).values())


def test_bad_images_fail_before_anything_is_written(conv_base: Path, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    with pytest.raises(InputError, match="is empty"):
        train(tiny_config(conv_base, tmp_path / "imgs"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


PROMPTS = ("a V* dog", "a V* dog on the beach")
EVERY_OTHER_STEP = ["step-000002", "step-000004", "step-000006"]


def loss_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "loss.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def observed_config(base: Path, photos: Path) -> TrainConfig:
    """6 steps, checkpoints at 3 and 6, validation images every 2 steps."""
    return tiny_config(base, photos, checkpoint_every=3, validation_prompts=PROMPTS, validation_every=2)


@pytest.fixture(scope="module")
def uninterrupted(conv_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("observed") / "run"
    train(observed_config(conv_base, photos), out, progress=False)
    return out


def kill_after(config: TrainConfig, out: Path, step: int) -> None:
    """Train in another process and SIGKILL it after ``step``: no finally, no flush on exit."""
    script = (
        "import json, os, signal, sys\n"
        "from persres.config import TrainConfig\n"
        "from persres.training.train import train\n"
        "def kill(step, loss):\n"
        f"    if step == {step}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False, callback=kill)\n"
    )
    argv = [sys.executable, "-c", script, config.to_json(), str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("kill", "after"), [("raise", 3), ("sigkill", 5)])
def test_killed_and_resumed_run_logs_every_step_once(
    conv_base: Path, photos: Path, tmp_path: Path, uninterrupted: Path, kill: str, after: int
) -> None:
    config, out = observed_config(conv_base, photos), tmp_path / "run"
    if kill == "raise":

        def stop(step: int, loss: float) -> None:
            if step == after:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(config, out, progress=False, callback=stop)
    else:
        kill_after(config, out, after)
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, after + 1))  # on disk despite the kill
    stale = out / "validation" / "step-000004"  # the killed run's images after its checkpoint at step 3
    if after > 4:
        (stale / "marker").write_text("from the killed run")
    train(config, out, resume=True, progress=False)
    rows, whole = loss_rows(out), loss_rows(uninterrupted)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    for key in ("loss", "smoothed_loss", "lr"):
        assert [float(r[key]) for r in rows] == pytest.approx([float(r[key]) for r in whole], abs=1e-6)
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed)  # cumulative over the two runs
    assert (out / "logs" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "validation").iterdir()) == EVERY_OTHER_STEP
    assert (stale / "grid.png").is_file() and not (stale / "marker").exists()  # redone


@pytest.mark.slow
def test_validation_every_writes_a_folder_per_step(uninterrupted: Path) -> None:
    root = uninterrupted / "validation"
    assert sorted(p.name for p in root.iterdir()) == EVERY_OTHER_STEP
    for folder in root.iterdir():
        images = sorted(folder.glob("0*.png"))
        assert [p.name for p in images] == ["0000-a-v-dog-normal.png", "0001-a-v-dog-on-the-beach-normal.png"]
        sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in images]
        assert [s["prompt"] for s in sidecars] == list(PROMPTS)
        assert {s["train_step"] for s in sidecars} == {int(folder.name.removeprefix("step-"))}
        with Image.open(folder / "grid.png") as grid:
            assert grid.size == (2 * 16 + 2, 16)  # the two prompts side by side
    assert len(loss_rows(uninterrupted)) == 6 and (uninterrupted / "logs" / "loss.png").is_file()


@pytest.mark.slow
def test_final_validation_images_are_the_last_steps_folder_and_change_nothing(
    conv_base: Path, photos: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    config = tiny_config(conv_base, photos, checkpoint_every=3, validation_prompts=PROMPTS[:1])
    result = train(config, tmp_path / "run", progress=False)
    final = tmp_path / "run" / "validation"
    assert [p.name for p in final.iterdir()] == ["step-000006"]
    assert sorted(p.name for p in (final / "step-000006").iterdir()) == [
        "0000-a-v-dog-normal.json",
        "0000-a-v-dog-normal.png",
        "grid.png",
    ]
    observed = factors(uninterrupted / "residuals.safetensors")
    for key, value in factors(result.residuals).items():  # sampling during training leaves it alone
        assert torch.equal(observed[key], value), key


@pytest.mark.slow
def test_resume_with_another_lr_trains_with_it(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(conv_base, photos, steps=2), out, progress=False)
    result = train(tiny_config(conv_base, photos, steps=4, lr=2e-3), out, resume=True, progress=False)
    assert [float(r["lr"]) for r in loss_rows(out)] == [1e-2, 1e-2, 2e-3, 2e-3]
    assert json.loads(read_residual_file(result.residuals).metadata["train_config"])["lr"] == 2e-3


@pytest.mark.slow
def test_two_processes_train_one_run(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "persres"]
    argv += ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(out), "--class-word"]
    argv += ["dog", "--steps", "2", "--batch-size", "1", "--resolution", "16", "--checkpoint-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*argv, "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts) == [
        "residuals.safetensors"
    ]
    checkpoint = out / "checkpoints" / "step-000002"
    rng = [checkpoint / f"rng-{i}.safetensors" for i in (0, 1)]
    assert all(p.is_file() for p in rng) and rng[0].read_bytes() != rng[1].read_bytes()  # one per process
    assert [r["step"] for r in loss_rows(out)] == ["1", "2"]  # written once, by the main process


def test_tensorboard_gets_the_loss(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    train(tiny_config(conv_base, photos, steps=2, report_to="tensorboard"), tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "logs" / "persres").glob("events.out.tfevents.*"))


class FixedLatentVae:
    """A VAE stand-in whose posterior is a point: the training latents are known exactly."""

    dtype = torch.float64
    config = SimpleNamespace(scaling_factor=0.5)

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=self.mean, std=torch.zeros_like(self.mean)))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_training_target_follows_the_prediction_type(prediction_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    vae = FixedLatentVae(torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64))
    latents = vae.mean * vae.config.scaling_factor
    seen: dict[str, torch.Tensor] = {}

    def unet(noisy: torch.Tensor, steps: torch.Tensor, **text: torch.Tensor) -> SimpleNamespace:
        seen.update(noisy=noisy, steps=steps, prediction=torch.randn(noisy.shape, generator=g))
        return SimpleNamespace(sample=seen["prediction"])

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    text, pixels = Conditioning(torch.zeros(1, 7, 32)), torch.zeros(3, 3, 8, 8)
    loss = denoising_loss(unet, SimpleNamespace(vae=vae), scheduler, text, pixels, torch.Generator())
    # the noise that was drawn, recovered from x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise
    abar = scheduler.alphas_cumprod.double()[seen["steps"]].view(-1, 1, 1, 1)
    noise = (seen["noisy"] - abar.sqrt() * latents) / (1 - abar).sqrt()
    velocity = scheduler.get_velocity(latents, noise, seen["steps"])
    torch.testing.assert_close(velocity, abar.sqrt() * noise - (1 - abar).sqrt() * latents)
    target, other = (velocity, noise) if prediction_type == "v_prediction" else (noise, velocity)
    prediction = seen["prediction"].double()
    torch.testing.assert_close(loss.double(), (prediction - target).square().mean(), rtol=1e-5, atol=0)
    assert not torch.isclose(loss.double(), (prediction - other).square().mean(), rtol=1e-3)


def write_lock(out: Path, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (out / ".persres.lock").write_text(json.dumps(lock))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_files_persres_did_not_write(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text('{"learning_rate": 1}')  # the user's own project files
    (out / "checkpoints" / "model.ckpt").write_text("weights")
    before = snapshot(out)
    for flags in ({"overwrite": True}, {}, {"resume": True}):
        with pytest.raises(OutputExistsError) as caught:
            train(tiny_config(conv_base, photos), out, progress=False, **flags)
        assert "persres did not write: config.json, checkpoints; choose another folder" in str(caught.value)
        assert "training run" not in str(caught.value)
        assert snapshot(out) == before


def test_resume_needs_a_persres_run(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes", tmp_path / "missing"):
        with pytest.raises(InputError, match=f"`resume`: `out` {out} holds no persres training run"):
            train(tiny_config(conv_base, photos), out, resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "missing").exists()


def test_out_and_images_must_be_apart(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    own = tmp_path / "photos"
    shutil.copytree(photos, own)
    (tmp_path / "link").symlink_to(own)
    before = snapshot(own)
    for out in (own, own / "run", tmp_path / "link"):
        with pytest.raises(ConfigError, match=f"`out` {out} .*`images` {own}"):
            train(tiny_config(conv_base, own), out, progress=False)
    with pytest.raises(ConfigError, match="overlap"):  # the photos inside the run folder
        train(tiny_config(conv_base, own), tmp_path, progress=False)
    assert snapshot(own) == before


def test_a_live_lock_refuses_a_second_train(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, other.pid)
        assert main(train_argv(conv_base, photos, out)) == 2
        error = capsys.readouterr().err
        assert f"in use by another persres train: pid {other.pid} on host {socket.gethostname()}" in error
        assert "since 2026-01-01" in error
        assert json.loads((out / ".persres.lock").read_text())["pid"] == other.pid  # left alone
        assert sorted(p.name for p in out.iterdir()) == [".persres.lock"]
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_a_dead_process_lock_is_taken_over(
    conv_base: Path, photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # exited and reaped: its pid is no longer alive
    write_lock(out, gone.pid)
    with caplog.at_level(logging.WARNING, logger="persres"):
        train(tiny_config(conv_base, photos, steps=2), out, progress=False)
    assert f"taking over the stale lock {out / '.persres.lock'}: pid {gone.pid}" in caplog.text
    assert not (out / ".persres.lock").exists()
    assert (out / "residuals.safetensors").is_file()


@pytest.mark.slow
def test_the_lock_is_held_for_the_run_and_released_when_it_raises(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    held: list[dict[str, object]] = []

    def look_then_crash(step: int, loss: float) -> None:
        held.append(json.loads((out / ".persres.lock").read_text()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(conv_base, photos), out, progress=False, callback=look_then_crash)
    assert held[0]["pid"] == os.getpid() and held[0]["host"] == socket.gethostname()
    assert not (out / ".persres.lock").exists()
    assert json.loads((out / "persres-run.json").read_text())["files"] == [
        "logs/loss.csv", "config.json"
    ]  # fmt: skip  # what the run had written when it stopped, and nothing it had not


@pytest.mark.slow
def test_a_run_without_marker_is_recognised_by_its_content(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    """Runs of persres 0.1.0 have no persres-run.json; they resume and are overwritten as before."""
    out = tmp_path / "run"
    train(tiny_config(conv_base, photos, steps=2), out, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "persres-run.json").unlink()
    shutil.rmtree(out / "logs")  # 0.1.0 wrote no loss log
    with pytest.raises(OutputExistsError, match=r"already holds a training run \(residuals.safetensors"):
        train(tiny_config(conv_base, photos, steps=2), out, progress=False)
    longer = train(tiny_config(conv_base, photos, steps=3), out, resume=True, progress=False)
    assert read_residual_file(longer.residuals).metadata["step"] == "3"
    assert (out / "persres-run.json").is_file()  # adopted: marked from now on
    (out / "persres-run.json").unlink()
    shutil.rmtree(out / "logs")
    (out / "residuals.safetensors").unlink()  # as if 0.1.0 was killed: its checkpoints prove the run
    train(tiny_config(conv_base, photos, steps=2), out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.slow
def test_processes_of_one_accelerate_run_share_its_lock(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "persres", *train_argv(conv_base, photos, out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "residuals.safetensors").is_file() and (out / "persres-run.json").is_file()
    assert not (out / ".persres.lock").exists()


def test_a_bad_rank_with_overwrite_keeps_the_earlier_run(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = train_argv(conv_base, photos, run)
    assert main(argv) == 0
    before = sorted(p.name for p in run.iterdir())
    residuals = (run / "residuals.safetensors").read_bytes()
    assert main(argv + ["--overwrite", "--rank", "40"]) == 2
    assert "above the width" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "residuals.safetensors").read_bytes() == residuals
    assert main(train_argv(conv_base, photos, tmp_path / "fresh", "--rank", "40")) == 2
    assert not (tmp_path / "fresh").exists()  # no empty folder left behind


def test_bad_validation_prompts_fail_before_training(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_argv(conv_base, photos, tmp_path / "o")
    assert main(argv + ["--validation-prompt", "a V2* dog"]) == 2
    assert "V2*" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_without_checkpoint_refuses_other_settings(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = train_argv(conv_base, photos, run)
    assert main(argv) == 0
    for folder in (run / "checkpoints").iterdir():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    before = (run / "residuals.safetensors").read_bytes()
    assert main([*argv, "--resume", "--batch-size", "2"]) == 2
    assert "no checkpoint and was started with other settings" in capsys.readouterr().err
    assert (run / "residuals.safetensors").read_bytes() == before


def test_a_validation_prompt_cut_off_at_its_identifier_fails_before_training(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = train_argv(conv_base, photos, run)
    assert main([*argv, "--validation-prompt", "a " * 80 + "V* dog"]) == 2
    assert "falls past the text encoder's limit of 77 tokens" in capsys.readouterr().err
    assert not (run / "checkpoints").exists() and not (run / "residuals.safetensors").exists()


def test_a_damaged_config_of_a_run_without_checkpoint_is_named(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run)) == 0
    shutil.rmtree(run / "checkpoints")
    (run / "config.json").write_text('{"steps": "many"')  # cut short by hand
    assert main(train_argv(conv_base, photos, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} is damaged" in err and "--overwrite" in err


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 300.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 3 TB"),
        MemoryError(),
    ],
)
def test_a_batch_that_does_not_fit_says_so_and_leaves_nothing_behind(
    failure: BaseException,
    conv_base: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--batch-size 100000 ended in an allocation traceback and a half-made run folder."""

    def too_big(*args: object, **kwargs: object) -> torch.Tensor:
        raise failure

    monkeypatch.setattr("persres.training.train.denoising_loss", too_big)
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--batch-size", "3")) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("persres train: error: training does not fit in memory at --batch-size 3"), err
    assert "--gradient-checkpointing" in err and len(err) < 500
    assert not run.exists()


def test_a_resumed_run_that_does_not_fit_keeps_its_folder(
    conv_base: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run)) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    def too_big(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("persres.training.train.denoising_loss", too_big)
    assert main(train_argv(conv_base, photos, run, "--steps", "4", "--resume")) == 2
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
