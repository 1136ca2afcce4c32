"""The loss log: a bias-corrected moving average that resumes exactly, strict reading, plot, trackers."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from persres.config import TrainConfig
from persres.errors import ConfigError, InputError
from persres.training.trainlog import ALPHA, COLUMNS, LossLog, check_tracker, tracker_config

LOSSES = [0.9, 0.5, 0.7, 0.4, 0.45, 0.3, 0.35, 0.2]


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "loss.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_log(out: Path, losses: list[float], start: int = 0) -> LossLog:
    log = LossLog.open(out, start)
    for step, loss in enumerate(losses, start=start + 1):
        log.append(step, loss, 1e-3)
    log.close()
    return log


def test_smoothed_loss_is_a_bias_corrected_moving_average(tmp_path: Path) -> None:
    write_log(tmp_path, LOSSES)
    rows = rows_of(tmp_path)
    assert tuple(rows[0]) == COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == LOSSES and {r["lr"] for r in rows} == {"0.001"}
    ema = 0.0
    for t, (loss, row) in enumerate(zip(LOSSES, rows, strict=True), start=1):
        ema = (1 - ALPHA) * ema + ALPHA * loss  # the textbook EMA from 0, then Adam's correction
        assert float(row["smoothed_loss"]) == pytest.approx(ema / (1 - (1 - ALPHA) ** t), rel=1e-12)
    assert float(rows[0]["smoothed_loss"]) == LOSSES[0]
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def test_resume_drops_later_rows_and_continues_the_average_exactly(tmp_path: Path) -> None:
    write_log(tmp_path / "whole", LOSSES)
    write_log(tmp_path / "split", LOSSES[:5])  # the interrupted run got to step 5, its checkpoint is at 3
    write_log(tmp_path / "split", LOSSES[3:], start=3)
    whole, split = rows_of(tmp_path / "whole"), rows_of(tmp_path / "split")
    assert [int(r["step"]) for r in split] == list(range(1, 9))  # each step once
    for key in ("step", "loss", "smoothed_loss", "lr"):
        assert [r[key] for r in split] == [r[key] for r in whole]  # bit for bit: floats are written with repr


def test_elapsed_seconds_add_up_over_resumes(tmp_path: Path) -> None:
    write_log(tmp_path, LOSSES[:3])
    path = tmp_path / "logs" / "loss.csv"
    path.write_text(path.read_text().replace(",0.00", ",100.00"))  # the first run took 100 s
    write_log(tmp_path, LOSSES[3:5], start=3)
    assert [float(r["elapsed_seconds"]) >= 100 for r in rows_of(tmp_path)] == [True] * 5


def test_a_missing_log_starts_again_at_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        write_log(tmp_path, LOSSES[:2], start=4)
    assert "loss.csv is missing" in caplog.text
    assert [r["step"] for r in rows_of(tmp_path)] == ["5", "6"]
    assert float(rows_of(tmp_path)[0]["smoothed_loss"]) == LOSSES[0]


HEADER = ",".join(COLUMNS) + "\n"
GOOD = ["1,0.5,0.5,0.001,1.0\n", "2,0.4,0.45,0.001,2.0\n", "3,0.3,0.4,0.001,3.0\n"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "header is not step,loss"),
        ("step;loss\n" + "".join(GOOD), "header is not"),
        (HEADER + GOOD[0] + "2,zero,0.45,0.001,2.0\n" + GOOD[2], "line 3: could not convert"),
        (HEADER + GOOD[0] + "2,0.4,0.45\n" + GOOD[2], r"line 3: 3 fields, expected 5"),
        (HEADER + GOOD[0] + GOOD[2], "step 3 follows step 1"),
        (HEADER + GOOD[0] + GOOD[1], "the checkpoint is at step 3 but its rows end at step 2"),
        (HEADER, "it has no row at or before it"),
        (HEADER + GOOD[0] + "2,nan,0.45,0.001,2.0\n" + GOOD[2], "line 3: a step below 1 or a value"),
        (HEADER + GOOD[0] + GOOD[1] + GOOD[2] + "7,0.3,0.4,0.001,3.0\n", "step 7 follows step 3"),
    ],
)
def test_a_damaged_log_is_named_with_the_fix(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "logs" / "loss.csv"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(InputError, match=reason) as caught:
        LossLog.open(tmp_path, 3)
    assert str(path) in str(caught.value) and "delete it to resume from step 3" in str(caught.value)
    assert path.read_text() == text  # nothing rewritten


def test_plot_is_a_png(tmp_path: Path) -> None:
    log = write_log(tmp_path, LOSSES)
    assert log.plot().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "logs").iterdir() if p.name.startswith(".")] == []  # atomic


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("persres.training.trainlog.installed", lambda package: False)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(ConfigError, match=f"`report_to` {name} .* pip install {name}"):
            check_tracker(name)
    check_tracker("none")


def test_tracker_config_is_flat() -> None:
    config = TrainConfig(base="b", images="i", class_word="dog", validation_prompts=("a V* dog",))
    flat = tracker_config(config)
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["residual"] == '{"init": "zero", "rank": 0.05}' and flat["validation_every"] == "null"
