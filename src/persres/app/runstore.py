"""The app's run folders, all inside ``--runs``: names made safe and unique, names read back checked,
and what the Runs page lists about each run.

A name that reaches the app (a form field, an API call) is never joined to a path as given: a new run
gets ``safe_name`` of it, and an existing run is found only if its name is one of the folders listed
in ``--runs`` (``run_folder``), so ``../`` or an absolute path cannot leave it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from persres.config import TrainConfig
from persres.errors import InputError, quote
from persres.runfolder import CONFIG_FILE, LOCK, MARKER, RESIDUALS_FILE, parse_lock, pid_alive
from persres.trainlog import LOGS, LOSS_CSV, LOSS_PNG
from persres.validation import GRID, VALIDATION

PHOTOS = ".photos"  # runs/.photos/NAME/: a run's photos, kept outside its folder (train refuses overlap)
REQUEST = "app-request.json"  # the settings a run was started with, for resuming before config.json exists
NAME_LIMIT = 40
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def safe_name(text: str) -> str:
    """Lower-case letters, digits, ``-`` and ``_`` only: "My Dog/../x" -> "my-dog-x"."""
    name = _UNSAFE.sub("-", text.strip().lower()).strip("-_")[:NAME_LIMIT].strip("-_")
    return name or "concept"


def new_run(runs: Path, wanted: str) -> Path:
    """A fresh folder in ``runs`` named after ``wanted`` (made safe), ``-2``, ``-3`` ... if taken."""
    base = safe_name(wanted)
    runs.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        folder = runs / name
        try:
            folder.mkdir()  # exclusive: two requests never get the same folder
        except FileExistsError:
            continue
        return folder
    raise InputError(f"--runs {runs} already holds 10,000 runs named {base}; choose another name")


def run_names(runs: Path) -> list[str]:
    """The run folders in ``runs`` (those with persres' marker), newest first."""
    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_folder(runs: Path, name: str) -> Path:
    """The folder of the run called ``name``; refuses any name that is not a run listed in ``runs``."""
    if name not in run_names(runs):
        raise InputError(
            f"there is no run {quote(str(name))} in the runs folder; pick one from the list (Runs page)"
        )
    return runs / name


def photo_folder(runs: Path, run: Path) -> Path:
    return runs / PHOTOS / run.name


@dataclass(frozen=True)
class RunInfo:
    name: str
    status: str  # finished | training | interrupted
    class_word: str
    token: str
    steps_done: int
    steps: int
    last_loss: float | None

    def row(self) -> list[object]:
        loss = "" if self.last_loss is None else f"{self.last_loss:.4f}"
        return [
            self.name,
            self.status,
            f"{self.token} {self.class_word}",
            f"{self.steps_done}/{self.steps}",
            loss,
        ]


ROW_HEADERS = ["run", "status", "trigger", "steps", "last loss"]


def run_config(folder: Path) -> TrainConfig:
    """The settings of the run: its ``config.json``, or the app's request when training never got there."""
    for name in (CONFIG_FILE, REQUEST):
        path = folder / name
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            saved.pop("persres_version", None)
            return TrainConfig.from_dict(saved)
    raise InputError(f"run {folder.name} has no {CONFIG_FILE}: it cannot be resumed; start a new one")


def losses(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of ``logs/loss.csv``, empty when there is none yet."""
    path = folder / LOGS / LOSS_CSV
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split(",")
        if len(fields) >= 2:
            rows.append((int(fields[0]), float(fields[1])))
    return rows


def status(folder: Path) -> str:
    if (folder / RESIDUALS_FILE).is_file():
        return "finished"
    lock = folder / LOCK
    holder = parse_lock(lock.read_text(encoding="utf-8")) if lock.is_file() else None
    if holder is not None and isinstance(holder.get("pid"), int) and pid_alive(holder["pid"]):
        return "training"
    return "interrupted"


def run_info(folder: Path) -> RunInfo:
    config = run_config(folder)
    rows = losses(folder)
    last = rows[-1] if rows else None
    return RunInfo(
        folder.name,
        status(folder),
        config.class_word,
        config.token,
        last[0] if last else 0,
        config.steps,
        last[1] if last else None,
    )


def loss_plot(folder: Path) -> Path | None:
    path = folder / LOGS / LOSS_PNG
    return path if path.is_file() else None


def validation_grids(folder: Path) -> list[tuple[Path, str]]:
    """(grid.png, "step N") of every validation round, in step order."""
    grids = sorted((folder / VALIDATION).glob(f"step-*/{GRID}"))
    return [(g, f"step {int(g.parent.name.removeprefix('step-'))}") for g in grids]
