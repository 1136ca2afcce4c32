"""persres installed from a wheel, not run from the checkout: the wheel holds every file the package
reads, ``persres info`` and ``persres app --help`` work, and ``persres app`` finds the toy world only
where it is told (PERSRES_TOY_MODELS) or refuses in one line.

The wheel is built offline with the venv's own setuptools (``--no-build-isolation``: build isolation
would download setuptools) from a copy of the sources, so that the checkout gets no ``build/`` folder,
and installed with ``--target`` into a folder put first on PYTHONPATH: it shadows the editable install
without a second venv (which would need torch again: 1.4 GB). Every command runs in an empty folder,
never the checkout, and checks that the installed copy is the one imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from persres import ResidualConfig, add_residuals, save_residuals
from persres.formats.info import describe
from persres.testing.tiny import tiny_unet
from persres.toymodels import TOY_BASE, TOY_MODELS_ENV, TOY_ORACLE

CHECKOUT = Path(__file__).resolve().parents[1]
SOURCE = CHECKOUT / "src" / "persres"
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
# Path(__file__) is how a module finds something beside itself; only the toy-model finder may (it looks
# for a checkout, and copes with none). Anything else the package reads goes through importlib.resources.
READS_BESIDE_ITSELF = {"toymodels.py"}
RESOURCE = re.compile(r"""resources\.files\("persres"\)\.joinpath\("([^"]+)"\)""")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    site: Path  # what pip install --target wrote: site/persres is the package
    cwd: Path  # an empty folder: no models/, no checkout

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k not in (TOY_MODELS_ENV, "PYTHONPATH")}
        environ.update(PYTHONPATH=str(self.site), HF_HUB_OFFLINE="1", **env)
        return subprocess.run(
            [sys.executable, *args], cwd=self.cwd, env=environ, capture_output=True, text=True, timeout=120
        )


def pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    sources = root / "sources"
    shutil.copytree(SOURCE.parent, sources / "src", ignore=SKIPPED)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, sources / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "wheel"), str(sources))
    (wheel,) = (root / "wheel").glob("persres-*.whl")
    pip("install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel))
    (root / "cwd").mkdir()
    return Installed(wheel, root / "site", root / "cwd")


def package_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_the_wheel_holds_the_package_and_its_data(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    in_wheel = {name.removeprefix("persres/") for name in names if name.startswith("persres/")}
    assert "assets/wordnet_nouns.tsv.gz" in in_wheel
    assert in_wheel == package_files(SOURCE), "wheel != src/persres: check package-data in pyproject.toml"
    assert package_files(installed.site / "persres") >= in_wheel
    assert not [name for name in names if TOY_BASE in name or TOY_ORACLE in name]  # 36 MB: see toymodels


def test_every_file_the_package_reads_is_installed(installed: Installed) -> None:
    beside_itself = sorted(
        p.relative_to(SOURCE).as_posix() for p in SOURCE.rglob("*.py") if "__file__" in p.read_text()
    )
    assert set(beside_itself) <= READS_BESIDE_ITSELF, (
        f"{beside_itself}: read package data with importlib.resources"
    )
    resources = {name for p in SOURCE.rglob("*.py") for name in RESOURCE.findall(p.read_text())}
    assert resources, "no importlib.resources read found: the pattern no longer matches macro.py"
    for name in resources:
        assert (installed.site / "persres" / name).is_file(), f"{name} is read by persres but not installed"


def test_the_installed_copy_is_the_one_imported(installed: Installed) -> None:
    done = installed.run(
        "-c",
        "import persres, persres.evaluation.macro as m; print(persres.__file__); print(len(m.load_nouns()))",
    )
    assert done.returncode == 0, done.stderr
    imported, nouns = done.stdout.split()
    assert Path(imported).is_relative_to(installed.site), imported
    assert int(nouns) > 1000  # the WordNet asset, read from the installed copy


def test_info_and_app_help(installed: Installed, tmp_path: Path) -> None:
    unet = tiny_unet()
    add_residuals(unet, ResidualConfig(rank=3))
    residuals = save_residuals(unet, tmp_path / "residuals.safetensors")
    done = installed.run("-m", "persres", "info", str(residuals))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_parameters"] == describe(residuals)["total_parameters"]
    done = installed.run("-m", "persres", "app", "--help")
    assert done.returncode == 0 and "--base" in done.stdout, done.stderr


def test_the_app_without_toy_models_is_refused_in_one_line(installed: Installed) -> None:
    done = installed.run("-m", "persres", "app", "--runs", "runs")
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{TOY_MODELS_ENV}=" in err and "--base" in err and str(installed.cwd / "models") in err
    assert list(installed.cwd.iterdir()) == []  # refused before anything was written


def test_the_toy_models_are_found_through_the_setting(installed: Installed) -> None:
    finder = "import persres.toymodels as t; print(t.__file__); print(t.find_toy_model(t.TOY_BASE)); " \
        "print(t.find_toy_model(t.TOY_ORACLE))"  # fmt: skip
    done = installed.run("-c", finder, **{TOY_MODELS_ENV: str(CHECKOUT / "models")})
    assert done.returncode == 0, done.stderr
    module, base, oracle = done.stdout.split()
    assert Path(module).is_relative_to(installed.site)
    assert (Path(base), Path(oracle)) == (CHECKOUT / "models" / TOY_BASE, CHECKOUT / "models" / TOY_ORACLE)
