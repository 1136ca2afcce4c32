"""What a training run shows of itself: ``OUT/logs/loss.csv``, its plot ``OUT/logs/loss.png``, and an
optional accelerate tracker (``--report-to tensorboard|wandb``) logging into ``OUT/logs``.

``loss.csv`` has one row per optimizer step: ``step, loss, smoothed_loss, lr, elapsed_seconds``.
``loss`` is the step's denoising loss (averaged over the processes of a multi-process run);
``smoothed_loss`` an exponential moving average with bias correction, as Adam corrects its moments:
``s_t = s_(t-1) + ALPHA / (1 - (1 - ALPHA)^t) * (loss_t - s_(t-1))``, so ``s_1 = loss_1`` and the first
values are not pulled towards zero. Its whole state is the previous row (value and row count), so a
resumed run continues it from the row at its checkpoint's step, and its column equals an uninterrupted
run's. ``elapsed_seconds`` is the wall-clock time of the training loop since step 0, summed over
resumes (time an interrupted run spent after its last checkpoint is not counted: those steps are redone).

Rows are appended and flushed every step, so a killed run's rows up to its last checkpoint are on disk.
On resume from step k the rows after k (written by the interrupted run after its last checkpoint, and
done again) are dropped by an atomic rewrite.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from persres.config import TrainConfig
from persres.errors import ConfigError
from persres.files import atomic_path, write_text
from persres.formats.runfolder import LOSS_COLUMNS, LOSS_PNG, LossRow, damaged_log, loss_log, read_loss_log

log = logging.getLogger(__name__)

COLUMNS = LOSS_COLUMNS
ALPHA = 0.1  # weight of the newest loss in the moving average: about the last 10 steps count
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class LossLog:
    """``OUT/logs/loss.csv`` of one run, open for appending (main process only)."""

    def __init__(self, path: Path, rows: list[LossRow]) -> None:
        self.path = path
        self.rows = rows
        self.smoothed = rows[-1].smoothed_loss if rows else 0.0
        self.offset = rows[-1].elapsed_seconds if rows else 0.0
        self.started = time.perf_counter()
        self.handle: IO[str] | None = None  # opened by the first append, closed by close()

    @classmethod
    def open(cls, out: Path, step: int) -> LossLog:
        """A new log for a run starting at step 0, or the log of a run resumed at ``step``."""
        path = loss_log(out)
        rows = read_rows(path, step) if step > 0 else []
        if step > 0 and rows is None:
            log.warning("%s is missing: the log starts again at step %d", path, step + 1)
        write_text(path, ",".join(COLUMNS) + "\n" + "".join(row.line() for row in rows or []))
        return cls(path, rows or [])

    def append(self, step: int, loss: float, lr: float) -> LossRow:
        count = len(self.rows) + 1
        weight = ALPHA / (1 - (1 - ALPHA) ** count) if count > 1 else 1.0  # 1 - (1 - a) != a in floats
        self.smoothed += weight * (loss - self.smoothed)
        elapsed = self.offset + time.perf_counter() - self.started
        row = LossRow(step, loss, self.smoothed, lr, elapsed)
        self.rows.append(row)
        if self.handle is None:
            self.handle = open(self.path, "a", encoding="utf-8", newline="")
        self.handle.write(row.line())
        self.handle.flush()  # survives a kill of the process
        return row

    def sync(self) -> None:
        """Rows on disk before a checkpoint that counts on them is written (survives a power cut)."""
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def plot(self) -> Path:
        return plot_losses(self.rows, self.path.with_name(LOSS_PNG))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_rows(path: Path, step: int) -> list[LossRow] | None:
    """The rows up to ``step`` of an interrupted run's log (None when it has none); strict, and its steps
    must follow each other up to the checkpoint's."""
    if not path.is_file():
        return None
    fix = f"restore it, or delete it to resume from step {step} with a new log that starts at step {step + 1}"
    rows = read_loss_log(path, fix)
    for previous, row in zip(rows, rows[1:], strict=False):
        if row.step != previous.step + 1:
            raise damaged_log(path, f"step {row.step} follows step {previous.step}", fix)
    kept = [row for row in rows if row.step <= step]
    if not kept or kept[-1].step != step:
        last = f"its rows end at step {kept[-1].step}" if kept else "it has no row at or before it"
        raise damaged_log(path, f"the checkpoint is at step {step} but {last}", fix)
    return kept


def plot_losses(rows: list[LossRow], target: Path) -> Path:
    """Raw and smoothed loss against the step, written atomically."""
    # Figure + Agg canvas directly: pyplot's global backend switch would change a notebook's backend
    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [row.step for row in rows]
    axes.plot(steps, [row.loss for row in rows], color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    axes.plot(steps, [row.smoothed_loss for row in rows], color="tab:blue", label=f"smoothed (EMA {ALPHA})")
    axes.set(xlabel="step", ylabel="denoising loss", title="training loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png")
    return target


def check_tracker(report_to: str) -> None:
    """Fail before training when ``--report-to``'s package is missing (accelerate would only drop it)."""
    package = TRACKER_PACKAGES.get(report_to)
    if package is not None and not installed(package):
        extra = " (or pip install 'persres[tensorboard]')" if package == "tensorboard" else ""
        raise ConfigError(
            f"`report_to` {report_to} needs the {package} package, which is not installed: "
            f"pip install {package}{extra}, or use `report_to` none (the loss is in OUT/logs/loss.csv anyway)"
        )


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The run's settings as trackers take them: flat, with scalars or strings only."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)
        for key, value in config.to_dict().items()
    }
