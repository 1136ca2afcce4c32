"""Atomic output: write to a temporary name beside the target, then rename over it.

A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from persres.errors import OutputExistsError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success it is renamed to ``target``."""
    target = Path(target)
    if not overwrite and target.exists():
        raise OutputExistsError(f"{target} already exists; remove it or choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    ``target`` must not exist: folders are never replaced wholesale.
    """
    target = Path(target)
    if target.exists():
        raise OutputExistsError(f"{target} already exists; remove it or choose another output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for inner in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700, and some writers 0600 files
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~current_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
