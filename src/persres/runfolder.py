"""The training run folder (``train --out``): which files in it are persres', and who is writing it.

A run folder may hold the user's own files beside persres' (``RUN_NAMES``). Before anything else,
persres writes a marker, ``persres-run.json`` (persres version, creation time, the names it creates);
``--overwrite`` removes only names the marker lists, so a folder persres did not make is never
emptied: one with a ``config.json`` or ``checkpoints/`` but no marker is refused. Runs of persres
0.1.0, written before the marker, are recognised by their content (``is_earlier_run``).

``.persres.lock`` (made by an atomic exclusive create, holding pid, host and start time) keeps a
second ``train`` out of a folder in use; under ``accelerate launch`` only the main process holds it.
A lock whose process is gone (same host, pid not alive) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from persres import __version__
from persres.checkpoint import CHECKPOINTS, list_checkpoints
from persres.config import TrainConfig
from persres.errors import ConfigError, InputError, OutputExistsError, RunLockedError
from persres.files import write_json
from persres.io import FORMAT_NAME
from persres.methods.protocol import RESULT  # the peer methods' results; residuals: RESIDUALS_FILE

log = logging.getLogger(__name__)

MARKER = "persres-run.json"
LOCK = ".persres.lock"
RESIDUALS_FILE = "residuals.safetensors"
CONFIG_FILE = "config.json"
VALIDATION = "validation"
LOGS = "logs"
RUN_NAMES = (RESIDUALS_FILE, RESULT, CONFIG_FILE, CHECKPOINTS, VALIDATION, LOGS)
EARLIER_NAMES = (RESIDUALS_FILE, CONFIG_FILE, CHECKPOINTS, VALIDATION)  # what persres 0.1.0 wrote
MAX_PID = 2**31  # pids are C ints; a larger one is a damaged lock, not a process to ask about
UNREADABLE_LOCK_STALE_S = 60  # a lock left empty by a process killed between create and write


@dataclass
class RunFolder:
    """``--out`` of one training run, checked; ``claim`` locks it and makes it this run's."""

    path: Path
    resume: bool
    overwrite: bool
    lock: dict[str, Any] | None = field(default=None, init=False)
    created: bool = field(default=False, init=False)  # by claim: removed again if the claim fails

    @classmethod
    def check(cls, out: Path, images: str, resume: bool, overwrite: bool) -> RunFolder:
        """Refuse, before anything is loaded or written, what ``claim`` would refuse (read only)."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pick one")
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"--out {out} is a file; pass a folder")
        check_apart(out, images)
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
                remove_names(self.path, found.names)
            if not (found and found.marked and self.resume):
                write_marker(self.path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            release_lock(self.path / LOCK, self.lock)
            self.lock = None
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # a claim that failed in a folder it created leaves nothing behind


@dataclass(frozen=True)
class FoundRun:
    """A persres run in ``--out``: its names present there (what ``--overwrite`` removes)."""

    names: tuple[str, ...]
    marked: bool  # False: a run of persres 0.1.0, recognised by its content


def check_apart(out: Path, images: str) -> None:
    """A run folder inside the photo folder would be read as photos by later runs; and the reverse."""
    if not images:
        return  # no photo folder: the image loader says so
    out_path, photo_path = out.resolve(), Path(images).resolve()
    if out_path.is_relative_to(photo_path) or photo_path.is_relative_to(out_path):
        how = "is the same folder as" if out_path == photo_path else "and --images overlap:"
        raise ConfigError(
            f"--out {out} {how} --images {images}; a run folder must not hold the photos or be inside "
            "them (later runs would read its files as photos): choose another --out"
        )


def check_run(out: Path, resume: bool, overwrite: bool) -> FoundRun | None:
    """The run in ``out`` if there is one, refusing what the flags do not allow."""
    found = find_run(out)
    if found is None and resume:
        raise InputError(
            f"--resume: --out {out} holds no persres training run (no {MARKER}); "
            "leave out --resume to start one there, or pass the folder of the run to continue"
        )
    if found is not None and not (resume or overwrite):
        listed = ", ".join(found.names or (MARKER,))
        raise OutputExistsError(
            f"--out {out} already holds a training run ({listed}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    return found


def find_run(out: Path) -> FoundRun | None:
    """The persres run in ``out`` (None if none); refuses run-like files persres did not write."""
    if not out.is_dir():
        return None
    marker = read_marker(out)
    if marker is not None:
        owned = set(marker["files"]) & set(RUN_NAMES)
    else:
        owned = set(EARLIER_NAMES) if is_earlier_run(out) else set()
    present = [name for name in RUN_NAMES if os.path.lexists(out / name)]
    foreign = [name for name in present if name not in owned or (out / name).is_symlink()]
    if foreign:
        raise OutputExistsError(
            f"--out {out} holds files persres did not write: {', '.join(foreign)}; choose another folder"
        )
    if marker is None and not present:
        return None
    return FoundRun(tuple(present), marked=marker is not None)


def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER
    if not os.path.lexists(path):
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise OutputExistsError(f"{path} is not a persres run marker ({exc}); choose another --out") from None
    files = marker.get("files") if isinstance(marker, dict) else None
    names_ok = isinstance(files, list) and all(isinstance(name, str) for name in files)
    if not (names_ok and "persres_version" in marker):
        raise OutputExistsError(
            f"{path} is not a persres run marker (needs persres_version and a list of files); "
            "choose another --out"
        )
    return marker


def write_marker(out: Path) -> None:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out / MARKER, {"persres_version": __version__, "created": created, "files": list(RUN_NAMES)})


def is_earlier_run(out: Path) -> bool:
    """A run of persres 0.1.0 (no marker): its config.json is a persres TrainConfig with
    ``persres_version``, and its residuals file or one of its checkpoints' is a persres residual file."""
    try:
        saved = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        if not (isinstance(saved, dict) and "persres_version" in saved):
            return False
        TrainConfig.from_dict({k: v for k, v in saved.items() if k != "persres_version"})
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):  # ConfigError: a ValueError
        return False
    candidates = [out / RESIDUALS_FILE, *(c.folder / RESIDUALS_FILE for c in list_checkpoints(out))]
    return any(is_residual_file(path) for path in candidates)


def is_residual_file(path: Path) -> bool:
    """Reads only the safetensors header."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT_NAME
    except (SafetensorError, OSError, ValueError):
        return False


def remove_names(out: Path, names: tuple[str, ...]) -> None:
    """``--overwrite``: the earlier run's own files and folders, nothing else."""
    for name in names:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    log.info("--overwrite: removed %s from %s", ", ".join(names) or "nothing", out)


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
                f"--out {path.parent} is being locked by another process ({path} is not a lock persres can "
                f"read, yet); try again in a minute, or remove {path} if no persres train uses the folder"
            )
        return
    if holder["host"] != socket.gethostname() or pid_alive(holder["pid"]):
        raise RunLockedError(
            f"--out {path.parent} is in use by another persres train: {describe(holder)}. Wait for it, "
            f"or choose another --out; if that process is gone, remove {path}"
        )


def lock_text(path: Path) -> str | None:
    """The lock's text (bytes that are not UTF-8 make it unreadable, not an error); None without one."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def parse_lock(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except (ValueError, RecursionError):
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
