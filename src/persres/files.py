"""Atomic output: write to a temporary name beside the target, then rename it into place.

A crash leaves either the old file or the new one, never half of one.

When replacing was not asked for, the final step never replaces what appeared at the target after the
existence check (another ``merge`` into the same new ``--out``, say): of two writers one wins and the
other gets ``OutputExistsError``. A file is put in place by ``os.link(tmp, target)``, which fails with
``FileExistsError`` atomically; on a file system without hard links, by claiming the name with an
exclusive create and renaming over that claim. A folder is put in place by claiming the name with an
exclusive ``mkdir`` and renaming the finished folder onto that empty claim (POSIX ``rename`` replaces
an empty folder, and refuses one that is not empty, so a file put into the claim meanwhile is never
lost). Chosen over Linux' ``renameat2(RENAME_NOREPLACE)`` because it is one code path on every POSIX
system, with no ctypes; the cost is that the target may show as an empty folder for an instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from persres.errors import ConfigError, OutputExistsError, OutputPathError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success it is renamed to ``target``."""
    target = Path(target)
    if not overwrite and target.exists():
        raise exists_error(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        if overwrite:
            os.replace(tmp, target)
        else:
            place_file(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    ``target`` must not exist unless ``replace`` (a training run's own result, rewritten when the run is
    extended): the old folder is then moved aside and deleted only after the new one is in place.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise exists_error(target, "output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for inner in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700, and some writers 0600 files
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~current_umask())
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            place_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def exists_error(target: Path, what: str = "output path") -> OutputExistsError:
    return OutputExistsError(f"{target} already exists; remove it or choose another {what}")


def place_file(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` unless ``target`` exists, atomically (see the module's docstring)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise exists_error(target) from None
    except OSError:  # no hard links here (some network and FAT file systems): claim the name first
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise exists_error(target) from None
        os.replace(tmp, target)  # over our own empty claim
    else:
        tmp.unlink()


def place_dir(tmp: Path, target: Path) -> None:
    """Rename folder ``tmp`` to ``target`` unless ``target`` exists, atomically (see the docstring)."""
    try:
        os.mkdir(target)
    except FileExistsError:
        raise exists_error(target, "output folder") from None
    try:
        os.replace(tmp, target)  # onto our own empty claim; refused if something was put into it
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(target)  # only while still empty
        raise exists_error(target, "output folder") from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    with atomic_path(target, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike[str], data: Any, overwrite: bool = True) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite)


def check_writable(target: str | os.PathLike[str], setting: str, folder: bool = True) -> None:
    """Refuse an output that cannot be written, before any compute: a folder where a file is to be
    written (``folder=False``) or the reverse; and the nearest existing folder on the
    way to ``target`` must be a folder we can create files in (tried for real, so read-only file systems
    and permissions count as the operating system sees them)."""
    path = Path(target)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"`{setting}` {target} is a file; pass a folder")
    if not folder and path.is_dir():
        raise OutputPathError(f"`{setting}` {target} is a folder; pass the name of the file to write")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"`{setting}` {target} cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".persres-write-check.", dir=existing)
    except OSError as exc:
        raise OutputPathError(
            f"`{setting}` {target} is not writable: cannot create a file in {existing} ({exc.strerror}); "
            "choose another place"
        ) from None
    os.close(fd)
    os.unlink(probe)


Inputs = Iterable[tuple[str, "str | os.PathLike[str] | None"]]  # (setting, path) of what a call reads


def check_apart(out: str | os.PathLike[str], setting: str, inputs: Inputs, folder: bool = True) -> None:
    """Refuse, before anything is written, an output that overlaps what the command reads: one that is
    an input (links resolved), a folder that holds an input, or (``folder``) a folder inside an input
    folder. An output file inside an input folder is fine (``RESULTS/report.html``, a LoRA beside its
    run's residuals). Inputs that do not exist (a hub id, a missing file the loader will name) count
    for nothing; pass the file a command reads from a run folder, not the run folder."""
    target = Path(out).resolve()
    for input_setting, given in inputs:
        if not given or not os.path.lexists(given):
            continue
        source = Path(given).resolve()
        if target == source:
            how = "is"
        elif source.is_relative_to(target):
            how = "would hold"
        elif folder and source.is_dir() and target.is_relative_to(source):
            how = "would be inside"
        else:
            continue
        raise ConfigError(  # two settings that contradict each other
            f"`{setting}` {out} {how} `{input_setting}` {given}: an output must not overlap what the "
            f"command reads (it would be overwritten or read back as input); choose another `{setting}`"
        )


def cache_folder() -> Path:
    """Where persres caches what it computes once (noun embeddings, prior images): ``PERSRES_CACHE``
    or ``~/.cache/persres``."""
    return Path(os.environ.get("PERSRES_CACHE", Path.home() / ".cache" / "persres"))
