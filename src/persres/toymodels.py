"""Where the shipped toy-world models are: ``toyworld-base`` (29 MB) and ``toyworld-oracle`` (7.4 MB).

They live in the repository's ``models/`` folder, not in the package: in the wheel, 36 MB of weights
that only the demo, the app's default and the toy benchmarks use would be downloaded by every
``pip install persres`` (the package itself is 1.5 MB), and every release would spend a third of PyPI's
default 100 MB limit per file and add 36 MB to the project's 10 GB. So persres finds them, in this order:

1. ``PERSRES_TOY_MODELS``, a folder holding ``toyworld-base/`` and ``toyworld-oracle/`` (e.g. a clone's
   ``models/``). When it is set it is the only place looked: a wrong setting is reported, not skipped.
2. The checkout's ``models/``, when persres runs from a checkout (``src/persres`` beside a
   ``pyproject.toml``; an editable install counts).
3. ``models/`` in the current folder (a clone's root, where ``make demo`` runs).

Nothing here imports torch: ``persres app`` refuses a missing toy model before it loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from persres.errors import ModelError

TOY_MODELS_ENV = "PERSRES_TOY_MODELS"
TOY_BASE = "toyworld-base"
TOY_FLUX_BASE = "toyworld-flux"  # the same world on a Flux-shaped base (toyworld/train_flux_base.py)
TOY_BASES = (TOY_BASE, TOY_FLUX_BASE)
TOY_ORACLE = "toyworld-oracle"
PACKAGE = Path(__file__).resolve().parent  # src/persres in a checkout, site-packages/persres installed


def checkout_models(package: Path = PACKAGE) -> Path | None:
    """The checkout's ``models/`` when ``package`` is ``<checkout>/src/persres``; None when installed."""
    root = package.parents[1]
    if package.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root / "models"
    return None


def toy_model_folders() -> list[Path]:
    """The folders that may hold the toy models, in the order they are tried."""
    setting = os.environ.get(TOY_MODELS_ENV, "").strip()
    if setting:
        return [Path(setting).expanduser()]
    folders = [checkout_models(), Path.cwd() / "models"]
    return list(dict.fromkeys(folder.resolve() for folder in folders if folder is not None))


def locate_toy_model(name: str = TOY_BASE) -> Path | None:
    """The first ``<folder>/<name>`` that exists, or None: for questions such as "is this base the toy
    model?", which must not fail where the toy models are absent."""
    for folder in toy_model_folders():
        if (folder / name).is_dir():
            return (folder / name).resolve()
    return None


def find_toy_model(name: str = TOY_BASE) -> Path:
    """The shipped toy model ``name`` (``toyworld-base`` or ``toyworld-oracle``); a one-line ModelError
    saying where it looked and how to get it when it is nowhere."""
    found = locate_toy_model(name)
    if found is not None:
        return found
    looked = ", ".join(str(folder / name) for folder in toy_model_folders())
    if os.environ.get(TOY_MODELS_ENV, "").strip():
        fix = f"point {TOY_MODELS_ENV} at the folder that holds {name}/ (a persres clone's models/)"
    else:
        fix = f"clone the persres repository and run from it, or set {TOY_MODELS_ENV}=/path/to/models"
    raise ModelError(f"the shipped toy model {name} is not here (looked in {looked}); {fix}")
