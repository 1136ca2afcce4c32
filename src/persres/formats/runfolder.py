"""The training run folder (``train --out``): every name in it, its readers, which files in it are
persres', and who is writing it.

This module is the one owner of the run folder's names (``CONFIG_FILE``, ``RESIDUALS_FILE``, ``RESULT``,
``CHECKPOINTS``, ``VALIDATION``, ``LOGS``/``LOSS_CSV``/``LOSS_PNG``, the app's ``SAMPLES``, ``EXPORTS`` and
``REQUEST``, the marker and the lock) and of their readers (``residual_file``, ``list_checkpoints``,
``read_loss_log``, ``validation_grids``, ``loss_plot``, ``lock_held``); the modules that write those
files (checkpoint, trainlog, validation, the methods, the app) import the names from here. So that they
can, it imports only torch-free modules below them (config, header, files, readback, the methods'
catalog), never the training loop: ``persres info`` reads a run folder without importing torch.

A run folder may hold the user's own files beside persres' (``RUN_NAMES``). Before anything else,
persres writes a marker, ``persres-run.json`` (persres version, creation time, marker version, and
``files``: what this run wrote). A name is recorded in the marker before it is created (``record``),
so a run killed half-way still lists everything it left. Each entry is a path relative to the run
folder that persres wrote whole: a top-level file (``config.json``, ``residuals.safetensors``), a
method's ``result/``, a step's folder (``checkpoints/step-000050``, ``validation/step-000050``), a log
file (``logs/loss.csv``) or a tracker's folder (``logs/persres``). The folders holding the step
folders and logs (``checkpoints/``, ``validation/``, ``logs/``) are shared with the user.

``--overwrite`` removes exactly what the marker lists (and persres' hidden leftovers of a killed write,
``.NAME.*tmp`` / ``.NAME.old``), then the shared folders if that left them empty. It is refused, naming
them, when they hold anything else (a ``validation/my-photo.png``): nothing persres did not write is
ever removed, and nothing is left half-deleted. A run-folder name the marker does not cover (a
``result/`` beside a residuals run, a ``config.json`` with no marker) is refused for every flag.

Runs of earlier versions are recognised and overwritten as safely: the previous version's marker
listed every name a run *may* write, and persres 0.1.0 wrote none (``is_earlier_run`` recognises its
runs by their content); for both, what the run wrote is read from the names persres gives its files
(``earlier_written``), and ``result/`` counts only for a method that writes one. Resuming such a run
rewrites its marker in the current form.

``.persres.lock`` (made by an atomic exclusive create, holding pid, host and start time) keeps a
second ``train`` out of a folder in use; under ``accelerate launch`` only the main process holds it.
A lock whose process is gone (same host, pid not alive) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from persres import __version__, readback
from persres.config import TrainConfig
from persres.errors import ConfigError, InputError, OutputExistsError, ResidualFileError, RunLockedError
from persres.files import check_apart, write_json
from persres.formats.header import FORMAT_NAME, read_safetensors_header
from persres.methods.catalog import DEFAULT_METHOD, METHODS, method_info

log = logging.getLogger(__name__)

# Every name persres gives in a run folder; the modules that write or read them import them from here.
MARKER = "persres-run.json"
LOCK = ".persres.lock"
CONFIG_FILE = "config.json"
RESIDUALS_FILE = "residuals.safetensors"  # the residuals method's result (a residual file)
RESULT = "result"  # the folder in which a peer method saves its result
CHECKPOINTS = "checkpoints"  # checkpoints/step-NNNNNN/, written by persres.training.checkpoint
STATE_FILE = "state.json"  # in each checkpoint: its step and the run's settings
VALIDATION = "validation"  # validation/step-NNNNNN/, written by persres.training.validation
GRID = "grid.png"  # in each validation folder: its images side by side
LOGS = "logs"
LOSS_CSV = "loss.csv"  # logs/loss.csv, written by persres.training.trainlog
LOSS_PNG = "loss.png"
SAMPLES = "samples"  # what the app's Sample page (and a benchmark's variant) drew with the run
REQUEST = "app-request.json"  # the app's settings of a run, for resuming before config.json exists
EXPORTS = "exports"  # the app's LoRA files of the run
RUN_NAMES = (RESIDUALS_FILE, RESULT, CONFIG_FILE, CHECKPOINTS, VALIDATION, LOGS)
EARLIER_NAMES = (RESIDUALS_FILE, CONFIG_FILE, CHECKPOINTS, VALIDATION)  # what persres 0.1.0 wrote
MAX_PID = 2**31  # pids are C ints; a larger one is a damaged lock, not a process to ask about
MARKER_VERSION = 2  # 1 (no key): the names a run may write; 2: what it wrote
STEP = re.compile(r"step-\d{6,}")
SHARED = {  # the folders persres shares with the user, and the names it gives what it writes there
    CHECKPOINTS: STEP,
    VALIDATION: STEP,
    # logs/persres: tensorboard's folder, logs/wandb: wandb's
    LOGS: re.compile("|".join(map(re.escape, (LOSS_CSV, LOSS_PNG, "persres", "wandb")))),
}
LEFTOVER = re.compile(r"\..+\.(tmp|old)")  # persres' temporary names: .NAME.*tmp, .NAME.old
UNREADABLE_LOCK_STALE_S = 60  # a lock left empty by a process killed between create and write


@dataclass
class RunFolder:
    """``--out`` of one training run, checked; ``claim`` locks it and makes it this run's."""

    path: Path
    resume: bool
    overwrite: bool
    lock: dict[str, Any] | None = field(default=None, init=False)
    created: bool = field(default=False, init=False)  # by claim: removed again if the claim fails
    written: list[str] = field(default_factory=list, init=False)  # the marker's files, once claimed

    @classmethod
    def check(cls, out: Path, images: str, resume: bool, overwrite: bool, base: str = "") -> RunFolder:
        """Refuse, before anything is loaded or written, what ``claim`` would refuse (read only). A run
        folder must not hold the photos or be inside them (later runs would read its files as photos),
        nor overlap a base model folder."""
        if resume and overwrite:
            raise ConfigError("`resume` and `overwrite` contradict each other; pick one")
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"`out` {out} is a file; pass a folder")
        check_apart(out, "out", [("images", images), ("base", base)])
        check_run(out, resume, overwrite)
        if out.is_dir():
            refuse_if_locked(out / LOCK)
        return cls(out, resume, overwrite)

    def claim(self) -> None:
        """Main process only: lock the folder, then (checked again under the lock) remove the earlier
        run's files for ``--overwrite`` and write this run's marker."""
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = take_lock(self.path / LOCK)
            found = check_run(self.path, self.resume, self.overwrite)  # the folder may have changed
            if found and self.overwrite:
                remove_written(self.path, found.written)
            self.written = list(found.written) if found and self.resume else []
            if not (found and found.current and self.resume):
                write_marker(self.path, self.written)
        except BaseException:
            self.release()
            raise

    def record(self, *paths: Path | str) -> None:
        """Before creating them: add ``paths`` (in the run folder) to the marker. Only the process that
        claimed the folder writes it; for the others (and before the claim) this does nothing."""
        if self.lock is None:
            return
        names = [inside(self.path, Path(path)) for path in paths]
        new = [name for name in names if name not in self.written]
        if new:
            self.written.extend(new)
            write_marker(self.path, self.written)

    def release(self) -> None:
        if self.lock is not None:
            release_lock(self.path / LOCK, self.lock)
            self.lock = None
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a claim that failed in a folder it created leaves nothing behind


def inside(out: Path, path: Path) -> str:
    """``path`` (``out / ...``, or already relative to ``out``) as a marker entry."""
    return (path.relative_to(out) if path.is_relative_to(out) else path).as_posix()


@dataclass(frozen=True)
class FoundRun:
    """A persres run in ``--out``: its names present there, and what it wrote (``--overwrite`` removes
    that)."""

    names: tuple[str, ...]
    written: tuple[str, ...]  # paths relative to the run folder, as the marker lists them
    marked: bool  # False: a run of persres 0.1.0, recognised by its content
    current: bool  # a marker of this version (False: an earlier one, or none)


def result_name(method: str) -> str:
    """Where a method's result is in its run folder."""
    return RESIDUALS_FILE if method_info(method).trains_residuals else RESULT


def check_run(out: Path, resume: bool, overwrite: bool) -> FoundRun | None:
    """The run in ``out`` if there is one, refusing what the flags do not allow."""
    found = find_run(out)
    if found is None and resume:
        raise InputError(
            f"`resume`: `out` {out} holds no persres training run (no {MARKER}); "
            "leave out `resume` to start one there, or pass the folder of the run to continue"
        )
    if found is not None and not (resume or overwrite):
        listed = ", ".join(found.names or (MARKER,))
        raise OutputExistsError(
            f"`out` {out} already holds a training run ({listed}); pass `resume` to continue it, "
            "`overwrite` to replace it, or choose another folder"
        )
    if found is not None and overwrite:
        others = not_written(out, found.written)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise OutputExistsError(
                f"`overwrite`: `out` {out} holds files persres did not write among its run's: {shown}; "
                "move them out of the folder (`overwrite` removes only what the run wrote), or choose "
                "another folder"
            )
    return found


def find_run(out: Path) -> FoundRun | None:
    """The persres run in ``out`` (None if none); refuses run-like files persres did not write."""
    if not out.is_dir():
        return None
    marker = read_marker(out)
    current = marker is not None and marker.get("marker_version") == MARKER_VERSION
    if marker is not None and current:
        written = [name for name in marker["files"] if is_run_path(name)]
        owned = {name.split("/")[0] for name in written}
    else:
        owned = set(marker["files"]) & set(RUN_NAMES) if marker else set()
        if marker is None and is_earlier_run(out):
            owned = set(EARLIER_NAMES)
        if RESULT in owned and not writes_result(out):
            owned.discard(RESULT)  # the previous marker claimed it whatever the method
        written = earlier_written(out, owned)
    present = [name for name in RUN_NAMES if os.path.lexists(out / name)]
    foreign = [name for name in present if name not in owned or (out / name).is_symlink()]
    if foreign:
        raise OutputExistsError(
            f"`out` {out} holds files persres did not write: {', '.join(foreign)}; choose another folder"
        )
    if marker is None and not present:
        return None
    return FoundRun(tuple(present), tuple(written), marked=marker is not None, current=current)


def is_run_path(name: str) -> bool:
    """A marker entry that names something inside the run folder under one of ``RUN_NAMES``."""
    parts = name.split("/")
    return parts[0] in RUN_NAMES and all(part not in ("", ".", "..") for part in parts)


def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER
    if not os.path.lexists(path):
        return None
    try:
        marker = readback.load_file(path)
    except (OSError, ValueError) as exc:
        raise OutputExistsError(f"{path} is not a persres run marker ({exc}); choose another `out`") from None
    files = marker.get("files") if isinstance(marker, dict) else None
    names_ok = isinstance(files, list) and all(isinstance(name, str) for name in files)
    if not (names_ok and "persres_version" in marker):
        raise OutputExistsError(
            f"{path} is not a persres run marker (needs persres_version and a list of files); "
            "choose another `out`"
        )
    return marker


def write_marker(out: Path, written: list[str]) -> None:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    marker = {"persres_version": __version__, "created": created, "marker_version": MARKER_VERSION}
    write_json(out / MARKER, {**marker, "files": written})


def is_earlier_run(out: Path) -> bool:
    """A run of persres 0.1.0 (no marker): its config.json is a persres TrainConfig with
    ``persres_version``, and its residuals file or one of its checkpoints' is a persres residual file."""
    try:
        saved = readback.load_file(out / CONFIG_FILE)
        if not (isinstance(saved, dict) and "persres_version" in saved):
            return False
        TrainConfig.from_dict({k: v for k, v in saved.items() if k != "persres_version"})
    except (OSError, ValueError, TypeError, AttributeError):  # ConfigError: a ValueError
        return False
    candidates = [out / RESIDUALS_FILE, *(c.folder / RESIDUALS_FILE for c in list_checkpoints(out))]
    return any(is_residual_file(path) for path in candidates)


def is_residual_file(path: Path) -> bool:
    """Reads only the safetensors header (by ``header``: no torch, no safetensors for ``info``)."""
    if not path.is_file():
        return False
    try:
        metadata, _ = read_safetensors_header(path)
    except ResidualFileError:
        return False
    return metadata.get("format") == FORMAT_NAME


def writes_result(out: Path) -> bool:
    """An earlier run's ``config.json`` names a method that saves a ``result/`` folder."""
    try:
        saved = readback.load_file(out / CONFIG_FILE)
    except (OSError, ValueError):
        return False
    method = saved.get("method", DEFAULT_METHOD) if isinstance(saved, dict) else DEFAULT_METHOD
    if not isinstance(method, str):
        return False
    return method not in METHODS or result_name(method) == RESULT  # an unknown method: not residuals


def earlier_written(out: Path, owned: set[str]) -> list[str]:
    """What a run of an earlier version wrote among the ``owned`` names, by the names persres gives:
    top-level files and ``result/`` whole; in the shared folders, the step folders and the logs."""
    written = []
    for name in sorted(owned):
        if name not in SHARED:
            written.append(name)
            continue
        folder = out / name
        children = sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
        written += [f"{name}/{child.name}" for child in children if SHARED[name].fullmatch(child.name)]
    return written


def not_written(out: Path, written: tuple[str, ...]) -> list[str]:
    """What else is in the folders holding ``written`` paths (persres' leftovers aside), and written
    paths that are links (persres makes none): what ``--overwrite`` must not remove."""
    entries = set(written)
    parents = {"/".join(name.split("/")[:i]) for name in written for i in range(1, name.count("/") + 1)}
    others = []
    for parent in sorted(parents):
        folder = out / parent
        if parent in entries or folder.is_symlink() or not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            name = f"{parent}/{child.name}"
            if name in parents or LEFTOVER.fullmatch(child.name):
                continue
            if name not in entries or child.is_symlink():
                others.append(name)
    return others


def remove_written(out: Path, written: tuple[str, ...]) -> None:
    """``--overwrite``: what the earlier run wrote and persres' leftovers of a killed write; then the
    folders holding them, only if that left them empty. Nothing else."""
    for name in sorted(written, key=lambda name: -name.count("/")):
        remove(out / name)
    parents = {"/".join(name.split("/")[:i]) for name in written for i in range(1, name.count("/") + 1)}
    for parent in sorted(parents, key=lambda name: -name.count("/")):
        folder = out / parent
        if folder.is_symlink() or not folder.is_dir():
            continue
        for child in folder.iterdir():
            if LEFTOVER.fullmatch(child.name):
                remove(child)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: anything else stays
    log.info("`overwrite`: removed %s from %s", ", ".join(written) or "nothing", out)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def take_lock(path: Path) -> dict[str, Any]:
    """Create ``path`` exclusively (atomic: of two processes, one wins) or fail naming the holder."""
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }
    for _ in range(3):  # a stale lock is removed and the create retried; another process may win it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = lock_text(path)
            if text is not None:
                refuse_if_locked(path)
                log.warning("taking over the stale lock %s: %s", path, describe(parse_lock(text)))
                if lock_text(path) == text:  # not replaced by another process meanwhile
                    path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(mine, handle)
        return mine
    raise RunLockedError(f"{path.parent} is being locked by other processes; try again")


def refuse_if_locked(path: Path) -> None:
    """Raise ``RunLockedError`` if a live process holds the lock at ``path``."""
    text = lock_text(path)
    if text is None:
        return
    holder = parse_lock(text)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < UNREADABLE_LOCK_STALE_S:
            raise RunLockedError(
                f"`out` {path.parent} is being locked by another process ({path} is not a lock persres can "
                f"read, yet); try again in a minute, or remove {path} if no persres train uses the folder"
            )
        return
    if holder["host"] != socket.gethostname() or pid_alive(holder["pid"]):
        raise RunLockedError(
            f"`out` {path.parent} is in use by another persres train: {describe(holder)}. Wait for it, "
            f"or choose another `out`; if that process is gone, remove {path}"
        )


def lock_text(path: Path) -> str | None:
    """The lock's text (bytes that are not UTF-8 make it unreadable, not an error); None without one."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def parse_lock(text: str) -> dict[str, Any] | None:
    try:
        holder = readback.loads(text)
    except ValueError:
        return None
    pid = holder.get("pid") if isinstance(holder, dict) else None
    valid = type(pid) is int and 0 < pid < MAX_PID
    return holder if valid and isinstance(holder.get("host"), str) else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "unreadable"
    return f"pid {holder['pid']} on host {holder['host']} since {holder.get('started', '?')}"


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def release_lock(path: Path, mine: dict[str, Any]) -> None:
    """Remove the lock, only if it is still this process's."""
    text = lock_text(path)
    if text is not None and parse_lock(text) == mine:
        path.unlink(missing_ok=True)


# The readers of what a run wrote, for ``train --resume``, ``info``, ``export`` and the app.


def residual_file(path: str | os.PathLike[str]) -> Path:
    """The residual file itself, or a training run's folder meaning its ``residuals.safetensors``."""
    path = Path(path)
    if path.is_dir() and (path / RESIDUALS_FILE).is_file():
        path = path / RESIDUALS_FILE
    if not path.is_file():
        raise ResidualFileError(
            f"residual file {path} not found; pass the {RESIDUALS_FILE} of a training run"
        )
    return path


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int


def list_checkpoints(out: Path) -> list[Checkpoint]:
    """The checkpoints of a run, oldest first; a ``step-*`` folder that is not one is an error."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.name.startswith("step-"):
            continue  # staging (.step-*.tmp) and anything the user keeps there
        number = folder.name.removeprefix("step-")
        if not (number.isdecimal() and number.isascii()) or not folder.is_dir():
            raise InputError(
                f"{folder} is not a checkpoint (persres names them step-NNNNNN); move it out of {root}, "
                "or start again with `overwrite`"
            )
        if not (folder / STATE_FILE).is_file():
            raise damaged_checkpoint(folder / STATE_FILE, "missing")
        found.append(Checkpoint(folder, int(number)))
    return sorted(found, key=lambda c: c.step)


def damaged_checkpoint(file: Path, what: str) -> InputError:
    return InputError(
        f"checkpoint file {file} is damaged or was edited ({what}); delete {file.parent} to resume from "
        "the checkpoint before it (from step 0 if there is none), or start again with `overwrite`"
    )


LOSS_COLUMNS = ("step", "loss", "smoothed_loss", "lr", "elapsed_seconds")
NO_CURVE = "restore it, or delete it (no loss curve)"


@dataclass(frozen=True)
class LossRow:
    """One row of ``logs/loss.csv`` (persres.training.trainlog says what the columns mean)."""

    step: int
    loss: float
    smoothed_loss: float
    lr: float
    elapsed_seconds: float

    def line(self) -> str:
        # repr keeps every bit of a float, so the smoothing continues exactly on resume
        return f"{self.step},{self.loss!r},{self.smoothed_loss!r},{self.lr!r},{self.elapsed_seconds:.3f}\n"


def loss_log(out: Path) -> Path:
    return out / LOGS / LOSS_CSV


def read_loss_log(path: Path, fix: str = NO_CURVE) -> list[LossRow]:
    """Every row of a loss log, strictly (its header, then rows of finite numbers from step 1); a damaged
    or edited log is an ``InputError`` naming it, what is wrong and ``fix``."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise damaged_log(path, f"not a readable CSV file: {exc}", fix) from None
    if not lines or tuple(lines[0]) != LOSS_COLUMNS:
        raise damaged_log(path, f"its header is not {','.join(LOSS_COLUMNS)}", fix)
    return [parse_loss_row(path, number, fields, fix) for number, fields in enumerate(lines[1:], start=2)]


def parse_loss_row(path: Path, number: int, fields: list[str], fix: str) -> LossRow:
    try:
        if len(fields) != len(LOSS_COLUMNS):
            raise ValueError(f"{len(fields)} fields, expected {len(LOSS_COLUMNS)}")
        row = LossRow(readback.integer(fields[0]), *(float(field) for field in fields[1:]))  # any length
    except ValueError as exc:
        raise damaged_log(path, f"line {number}: {exc}", fix) from None
    values = (row.loss, row.smoothed_loss, row.lr, row.elapsed_seconds)
    if row.step < 1 or not all(math.isfinite(value) for value in values):
        raise damaged_log(path, f"line {number}: a step below 1 or a value that is not finite", fix)
    return row


def damaged_log(path: Path, what: str, fix: str) -> InputError:
    return InputError(f"{path} is damaged or was edited ({what}); {fix}")


def loss_plot(out: Path) -> Path | None:
    path = out / LOGS / LOSS_PNG
    return path if path.is_file() else None


VALIDATION_ROUND = re.compile(r"step-(\d{1,9})")


def validation_grids(out: Path) -> list[tuple[int, Path]]:
    """(step, grid.png) of every validation round, in step order (folders not named step-N: not ours)."""
    rounds = [(int(found[1]), g) for g in (out / VALIDATION).glob(f"step-*/{GRID}")
              if (found := VALIDATION_ROUND.fullmatch(g.parent.name))]  # fmt: skip
    return sorted(rounds)


def lock_held(out: Path) -> bool:
    """Whether a live ``train`` holds the run's lock, as ``train`` judges it. A lock persres cannot read
    that no process is writing now is refused, naming it."""
    lock = out / LOCK
    try:
        refuse_if_locked(lock)
        text = lock_text(lock)
    except RunLockedError:
        return True
    except OSError as exc:
        raise InputError(f"{lock} is damaged or unreadable ({type(exc).__name__}: {exc})") from None
    if text is not None and parse_lock(text) is None:
        raise InputError(
            f"{lock} is damaged (not a lock persres wrote) and no training writes it now; delete it, "
            "then resume the run"
        )
    return False
