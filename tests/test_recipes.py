"""A method's recipe becomes a training configuration in one place (``persres.methods.recipes``): the
CLI, the benchmark and the app build the same configuration for the same inputs, and run folders of the
version before it load unchanged. Without torch: nothing here loads a model."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import persres
from persres.app.jobs import Recipe, make_config
from persres.cli import build_parser
from persres.cli.evaluation import benchmark_config_of
from persres.cli.training import train_config_of
from persres.config import TrainConfig
from persres.errors import ConfigError
from persres.evaluation.benchmark_plan import plan_variants, variant_train_config
from persres.evaluation.cc101 import ConceptEntry
from persres.formats.runs import read_run
from persres.methods.catalog import DEFAULT_METHOD, METHODS
from persres.methods.recipes import Overrides, train_config

BASE, IMAGES, CLASS, REASON = "models/sd15", "photos/dog", "dog", "dataset.json class_prompt"
BEFORE = Path(__file__).parent / "data" / "runs-before-recipes"  # config.json of each method, main 35bdc7a


def from_cli(method: str, *flags: str) -> TrainConfig:
    argv = ["train", "--base", BASE, "--images", IMAGES, "--class-word", CLASS, "--out", "o"]
    args = build_parser().parse_args([*argv, "--method", method, *flags])
    return train_config_of(args, CLASS, REASON)


def from_benchmark(method: str, *flags: str) -> TrainConfig:
    argv = ["benchmark", "--dataset", "d", "--base", BASE, "--out", "o", "--method", method, *flags]
    config = benchmark_config_of(build_parser().parse_args(argv))
    entry = ConceptEntry("pet_dog", "pet", CLASS, Path(IMAGES), ("a {}",))
    (variant,) = plan_variants(Path("o"), config, [entry])
    return variant_train_config(config, variant, CLASS, REASON)


def differences(one: TrainConfig, other: TrainConfig) -> dict[str, tuple[object, object]]:
    mine, theirs = one.to_dict(), other.to_dict()
    return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "flags",
    [
        ["--resolution", "512"],  # the method's own recipe
        ["--steps", "8", "--lr", "0.01", "--batch-size", "2", "--resolution", "64", "--seed", "3"]
        + ["--no-flip", "--mixed-precision", "bf16"],
    ],
)
def test_the_cli_and_the_benchmark_build_the_same_configuration(method: str, flags: list[str]) -> None:
    made = from_cli(method, *flags)
    assert differences(made, from_benchmark(method, *flags)) == {}
    assert made.method == method
    if "--steps" not in flags:
        recipe = METHODS[method].recipe
        assert (made.steps, made.batch_size, made.lr) == (recipe.steps, recipe.batch_size, recipe.lr)
        assert made.prior_images == recipe.prior_images  # 0 for the methods without prior preservation


def test_a_residual_rank_is_the_same_from_the_cli_and_the_benchmark() -> None:
    flags = ["--rank", "16", "--resolution", "512"]
    made = from_cli(DEFAULT_METHOD, *flags)
    assert made.residual.rank == 16
    assert differences(made, from_benchmark(DEFAULT_METHOD, *flags)) == {}


def test_the_app_builds_the_configuration_the_cli_builds() -> None:
    """The app trains residuals only, so only residuals is compared; its Train page's fields are steps,
    lr and rank, and its base's recipe gives batch size, resolution and flips."""
    recipe = Recipe(steps=8, lr=0.01, rank=16, batch_size=2, resolution=64, flip=False)
    app = make_config(BASE, Path(IMAGES), CLASS, "sks", 8, 0.01, "16", recipe)
    flags = ["--steps", "8", "--lr", "0.01", "--rank", "16", "--batch-size", "2", "--resolution", "64"]
    flags += ["--no-flip", "--checkpoint-every", "2", "--validation-prompt", "a photo of a V* dog"]
    cli = from_cli(DEFAULT_METHOD, *flags)
    assert differences(cli, TrainConfig.from_dict({**app.to_dict(), "class_reason": REASON})) == {}


@pytest.mark.parametrize("method", list(METHODS))
def test_run_folders_of_the_version_before_load_unchanged(method: str, tmp_path: Path) -> None:
    """The config.json each method's run got from persres before the recipes moved (written by
    ``persres train`` of main at 35bdc7a with no recipe flags) loads, names the same result, and is
    exactly what ``persres train`` builds now for the same command line."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(BEFORE / f"{method}.json", folder / "config.json")
    result = "residuals.safetensors" if METHODS[method].trains_residuals else "result"
    (folder / result).mkdir()
    run = read_run(folder)
    assert run is not None and run.result == folder / result
    argv = ["--resolution", "512"]
    now = from_cli(method, *argv)
    assert differences(TrainConfig.from_dict({**run.config.to_dict(), "class_reason": REASON}), now) == {}


def test_a_setting_the_method_does_not_take_is_refused_by_name() -> None:
    refused = r"prior_images does not apply to method lora \(its own settings: rank\)"
    with pytest.raises(ConfigError, match=refused):
        train_config("lora", BASE, IMAGES, CLASS, Overrides(prior_images=10))
    with pytest.raises(ConfigError, match="rank 0.5 for method lora must be a whole number"):
        train_config("lora", BASE, IMAGES, CLASS, Overrides(rank=0.5))
    with pytest.raises(TypeError, match="train_config sets steps itself"):
        train_config("lora", BASE, IMAGES, CLASS, steps=3)


def test_the_recipes_are_read_without_torch() -> None:
    script = (
        "import sys\n"
        "from persres.methods.recipes import train_config\n"
        "from persres.methods import METHODS\n"
        "made = train_config('dreambooth', 'b', 'i', 'dog')\n"
        "assert made.prior_images == METHODS['dreambooth'].recipe.prior_images > 0\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.replace("'", '"')) == []


def method_name_tests(tree: ast.Module) -> Iterator[int]:
    """Lines of ``tree`` that compare something with a method's name (``==``, ``!=``, ``in``)."""
    names = set(METHODS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            constants = [c for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)]
            if any(c.value in names for c in constants if isinstance(c.value, str)):
                yield node.lineno


def test_no_module_outside_methods_tests_a_method_by_name() -> None:
    """Issue 20: the catalog's capabilities answer what a method does; its name is never compared."""
    package = Path(persres.__file__).parent
    found = [
        f"{path.relative_to(package).as_posix()}:{line}"
        for path in sorted(package.rglob("*.py"))
        if "methods" not in path.relative_to(package).parts
        for line in method_name_tests(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not found, "ask persres.methods.catalog's capabilities instead: " + ", ".join(found)


def test_the_method_name_check_sees_a_comparison() -> None:
    tree = ast.parse(f"if config.method == {DEFAULT_METHOD!r}:\n    pass\nok = method in ('x', 'lora')\n")
    assert list(method_name_tests(tree)) == [1, 3]
