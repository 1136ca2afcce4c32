"""The app's run folders, all inside ``--runs``: names made safe and unique, names read back checked,
and what the Runs page lists about each run.

A run's files are read strictly, by the library's readers: one damaged or hand-edited file (its
``config.json``, its loss log, its lock) makes that run ``damaged: <what and how to fix it>``, an
``InputError`` naming the file; the other runs are listed as ever.

A name that reaches the app (a form field, an API call) is never joined to a path as given: a new run
gets ``safe_name`` of it, and an existing run is found only if its name is one of the folders listed
in ``--runs`` (``run_folder``), so ``../`` or an absolute path cannot leave it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from persres.config import TrainConfig
from persres.errors import InputError, PersresError, quote
from persres.formats.runfolder import (
    CONFIG_FILE,
    MARKER,
    REQUEST,
    lock_held,
    loss_log,
    read_loss_log,
    result_name,
)
from persres.formats.runfolder import (
    validation_grids as validation_rounds,
)
from persres.formats.runs import read_config

T = TypeVar("T")

PHOTOS = ".photos"  # runs/.photos/NAME/: a run's photos, kept outside its folder (train refuses overlap)
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
    raise InputError(f"`runs` {runs} already holds 10,000 runs named {base}; choose another name")


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
            return damage_named(path, lambda p: read_config(p, "the app reads the run's settings from it"))
    raise InputError(f"run {folder.name} has no {CONFIG_FILE}: it cannot be resumed; start a new one")


def losses(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of ``logs/loss.csv``, empty when there is none yet; a damaged log is refused."""
    path = loss_log(folder)
    if not path.is_file():
        return []
    return [(row.step, row.loss) for row in read_loss_log(path)]


def damage_named(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)``; an error the library's reader lets through (a file it did not expect) becomes an
    ``InputError`` naming ``path``, as the reader's own errors do."""
    try:
        return read(path)
    except PersresError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"{path} is damaged or unreadable ({type(exc).__name__}: {exc})") from None


def status(folder: Path, method: str) -> str:
    """finished (the method's result is there), training (a live process holds the lock, as ``train``
    judges it) or interrupted."""
    if (folder / result_name(method)).exists():
        return "finished"
    return "training" if lock_held(folder) else "interrupted"


def run_info(folder: Path) -> RunInfo:
    config = run_config(folder)
    rows = losses(folder)
    last = rows[-1] if rows else None
    return RunInfo(
        folder.name,
        status(folder, config.method),
        config.class_word,
        config.token,
        last[0] if last else 0,
        config.steps,
        last[1] if last else None,
    )


def damaged_row(name: str, error: PersresError) -> list[object]:
    """The Runs page's row of a run whose files cannot be read: what is wrong, in the status column."""
    return [name, f"damaged: {error}", "", "", ""]


def validation_grids(folder: Path) -> list[tuple[Path, str]]:
    """(grid.png, "step N") of every validation round, in step order."""
    return [(grid, f"step {step}") for step, grid in validation_rounds(folder)]
