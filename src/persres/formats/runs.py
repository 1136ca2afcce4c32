"""A training run folder, whatever its method: the settings it was trained with (``config.json``) and
where its result is (``residuals.safetensors`` for residuals, ``result/`` for the peer methods)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from persres import readback
from persres.config import TrainConfig
from persres.errors import InputError
from persres.formats.runfolder import CONFIG_FILE, RESIDUALS_FILE, RESULT, result_name
from persres.methods.catalog import METHODS


@dataclass(frozen=True)
class Run:
    folder: Path
    config: TrainConfig

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def result(self) -> Path:
        return self.folder / result_name(self.method)


def read_run(path: str | os.PathLike[str]) -> Run | None:
    """The run in folder ``path``; None when ``path`` is not a run folder (a residual file, say)."""
    folder = Path(path)
    config_file = folder / CONFIG_FILE
    if not (folder.is_dir() and config_file.is_file()):
        return None
    run = Run(folder, read_config(config_file, "it records how the run was trained"))
    if not run.result.exists():
        raise InputError(
            f"{folder} is a {run.method} run without its result {run.result.name}; finish it with `resume`"
        )
    return run


def read_from(source: str | os.PathLike[str]) -> Path:
    """What a command reads of ``source``: a run folder's result (``residuals.safetensors`` or
    ``result/``), else ``source`` itself. For ``persres.files.check_apart``: writing beside a run's
    result is fine, over it is not."""
    path = Path(source)
    for name in (RESIDUALS_FILE, RESULT):
        if path.is_dir() and os.path.lexists(path / name):
            return path / name
    return path


def peer_runs(sources: Sequence[object]) -> list[Run]:
    """The run folders among ``sources`` (paths, or residual files already read) made by another method
    than residuals."""
    runs = [read_run(s) for s in sources if isinstance(s, (str, os.PathLike))]
    return [run for run in runs if run is not None and not METHODS[run.method].trains_residuals]


def read_config(config_file: Path, why: str) -> TrainConfig:
    """A run's ``config.json``, strictly: a damaged or hand-edited one is named, with ``why`` it matters."""
    try:
        saved = readback.load_file(config_file)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        saved.pop("persres_version", None)
        return TrainConfig.from_dict(saved)
    except OSError as exc:
        raise InputError(f"{config_file} cannot be read ({exc.strerror or exc}); {why}") from None
    except ValueError as exc:  # readback's and ConfigError (a ValueError) name what is wrong
        raise InputError(f"{config_file} is damaged ({exc}); {why}") from None
