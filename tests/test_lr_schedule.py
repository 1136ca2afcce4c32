"""`lr_schedule`: constant (the paper's) or cosine from `lr` down to 0 over the run. The rate is a function
of the step, so a resumed run takes the same rates as an uninterrupted one (its factors equal, 1e-6), and
a cosine run cannot be extended (its rates depend on `steps`): refused by name."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import assert_same_factors, interrupted_and_resumed, tiny_config, train_argv

from persres.cli import main
from persres.config import TrainConfig
from persres.errors import ConfigError
from persres.training.train import train


def logged_rates(out: Path) -> list[float]:
    with (out / "logs" / "loss.csv").open() as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


def test_cosine_starts_at_lr_halves_midway_and_nears_zero_at_the_last_step() -> None:
    config = TrainConfig(base="b", images="i", class_word="dog", steps=10, lr=1e-2, lr_schedule="cosine")
    rates = [config.lr_at(step) for step in range(1, 11)]
    assert rates[0] == 1e-2 and math.isclose(rates[5], 5e-3)  # step 6 of 10: half way
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)) and 0 < rates[-1] < 3e-4
    assert {replace(config, lr_schedule="constant").lr_at(s) for s in range(1, 11)} == {1e-2}


def test_each_step_trains_at_its_scheduled_rate(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    config = tiny_config(conv_base, photos, steps=4, lr_schedule="cosine")
    train(config, tmp_path / "run", progress=False)
    assert logged_rates(tmp_path / "run") == pytest.approx([config.lr_at(s) for s in range(1, 5)], rel=1e-6)
    constant = tiny_config(conv_base, photos, steps=4)
    train(constant, tmp_path / "constant", progress=False)
    assert logged_rates(tmp_path / "constant") == [constant.lr] * 4
    cosine = (tmp_path / "run" / "residuals.safetensors").read_bytes()
    assert cosine != (tmp_path / "constant" / "residuals.safetensors").read_bytes()  # the rates mattered


def test_a_cosine_run_resumes_exactly_and_cannot_be_extended(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    config = tiny_config(conv_base, photos, steps=6, lr_schedule="cosine")
    whole = train(config, tmp_path / "whole", progress=False).residuals
    assert_same_factors(interrupted_and_resumed(config, tmp_path / "split", 3), whole)
    extended = r"\['steps'\] \(`lr_schedule` cosine decays over the run's `steps`: such a run cannot be"
    with pytest.raises(ConfigError, match=extended):
        train(replace(config, steps=8), tmp_path / "whole", resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"\['lr_schedule'\]"):
        train(replace(config, lr_schedule="constant"), tmp_path / "whole", resume=True, progress=False)
    constant = tiny_config(conv_base, photos, steps=6)
    train(constant, tmp_path / "constant", progress=False)
    train(replace(constant, steps=8), tmp_path / "constant", resume=True, progress=False)  # still extends
    assert len(logged_rates(tmp_path / "constant")) == 8


def test_the_cli_takes_lr_schedule_and_refuses_another(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_argv(conv_base, photos, tmp_path / "run", "--lr-schedule", "cosine")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr_schedule"] == "cosine"
    assert main(train_argv(conv_base, photos, tmp_path / "other", "--lr-schedule", "linear")) == 2
    assert "--lr-schedule: invalid choice: 'linear'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
