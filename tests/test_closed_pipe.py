"""A reader that stops early (``persres info RUN | head -c 100``) ends a command quietly, every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import persres
from persres import ResidualConfig, add_residuals, save_residuals
from persres.testing.tiny import tiny_unet


@pytest.fixture(scope="module")
def residual_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    unet = tiny_unet()
    add_residuals(unet, ResidualConfig(rank=2))
    return save_residuals(unet, tmp_path_factory.mktemp("run") / "residuals.safetensors", token="sks")


@pytest.mark.parametrize("command", [["info", "FILE"], ["--help"], ["train", "--help"]])
def test_a_closed_stdout_ends_the_command_quietly(residual_file: Path, command: list[str]) -> None:
    argv = [str(residual_file) if arg == "FILE" else arg for arg in command]
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first byte: every write meets a closed pipe
    try:
        done = subprocess.run(
            [sys.executable, "-m", "persres", *argv], stdout=write, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(persres.__file__).parents[1])}, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""  # no traceback, no "Exception ignored" at exit
    assert done.returncode == (0 if "--help" in argv else 141)  # argparse drops help it cannot write
