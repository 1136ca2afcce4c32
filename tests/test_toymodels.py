"""The shipped toy models found from a checkout, from PERSRES_TOY_MODELS or from ./models, and refused in
one line where they are nowhere (persres installed without a checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from persres import toymodels
from persres.errors import ModelError
from persres.toymodels import TOY_BASE, TOY_MODELS_ENV, TOY_ORACLE, checkout_models, find_toy_model

CHECKOUT_MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """As a wheel runs: no checkout above the package, no setting, a current folder without models/."""
    monkeypatch.setattr(toymodels, "checkout_models", lambda: None)
    monkeypatch.delenv(TOY_MODELS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_of_base(folder: Path) -> Path:
    (folder / TOY_BASE).mkdir(parents=True)
    return folder


def test_a_checkout_finds_both_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TOY_MODELS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the checkout is found from the package, not from the current folder
    assert find_toy_model(TOY_BASE) == CHECKOUT_MODELS / TOY_BASE
    assert find_toy_model(TOY_ORACLE) == CHECKOUT_MODELS / TOY_ORACLE


def test_checkout_models_only_for_src_beside_pyproject(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "persres"
    assert checkout_models(site) is None
    clone = tmp_path / "clone"
    (clone / "src" / "persres").mkdir(parents=True)
    assert checkout_models(clone / "src" / "persres") is None  # no pyproject.toml: not a checkout
    (clone / "pyproject.toml").write_text("[project]\n")
    assert checkout_models(clone / "src" / "persres") == clone / "models"


def test_installed_without_models_is_refused_in_one_line(installed: Path) -> None:
    with pytest.raises(ModelError) as refused:
        find_toy_model(TOY_BASE)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert str(installed / "models" / TOY_BASE) in message  # where it looked
    assert f"{TOY_MODELS_ENV}=/path/to/models" in message and "clone" in message  # how to get it
    assert toymodels.locate_toy_model(TOY_BASE) is None


def test_installed_finds_models_in_the_current_folder(installed: Path) -> None:
    copy_of_base(installed / "models")
    assert find_toy_model(TOY_BASE) == installed / "models" / TOY_BASE


def test_the_setting_is_the_only_place_looked(monkeypatch: pytest.MonkeyPatch, installed: Path) -> None:
    elsewhere = copy_of_base(installed / "elsewhere")
    copy_of_base(installed / "models")
    monkeypatch.setenv(TOY_MODELS_ENV, str(elsewhere))
    assert find_toy_model(TOY_BASE) == elsewhere / TOY_BASE
    with pytest.raises(ModelError, match=f"point {TOY_MODELS_ENV} at the folder that holds {TOY_ORACLE}/"):
        find_toy_model(TOY_ORACLE)  # not in ./models either: a wrong setting is reported, not skipped


def test_the_app_refuses_a_missing_toy_world_in_one_line(
    installed: Path, capsys: pytest.CaptureFixture
) -> None:
    from persres.cli import main

    assert main(["app", "--runs", str(installed / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert TOY_MODELS_ENV in err and "--base" in err
    assert not (installed / "runs").exists()


def test_the_app_recipe_needs_no_toy_world(installed: Path) -> None:
    from persres.app import jobs

    assert jobs.recipe_for("some/hub-model") == jobs.PAPER_RECIPE  # asked, not refused
    assert not jobs.is_shipped_base(str(installed / "models" / TOY_BASE))


def test_the_app_recipe_of_the_toy_world() -> None:
    from persres.app import jobs

    assert jobs.recipe_for(str(CHECKOUT_MODELS / TOY_BASE)) == jobs.TOY_RECIPE
