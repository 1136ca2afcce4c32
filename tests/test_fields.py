"""The library names settings, the command line names flags, the app names its fields (issue 20, 5).

The library's messages name a setting in backticks (``persres.errors``); ``persres.cli.flags`` turns
them into flags, ``persres.app.fields`` into the pages' labels."""

from __future__ import annotations

import argparse
import ast
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import train_argv

import persres
from persres.cli import build_parser, main
from persres.cli.flags import FLAGS, FlagNames, for_command_line
from persres.errors import SETTING, ConfigError

PACKAGE = Path(persres.__file__).parent
FRONT_ENDS = ("cli/", "toyworld/")  # the command line and the toy world's argparse mains keep their flags
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b(?![_=])")  # --class-word, not --scale_lr
# flags of other programs that the library cites, each with where and why
CITED_FLAGS = {
    ("methods/catalog.py", "--rank"): "diffusers' train_dreambooth_lora.py flag in the LoRA recipe's source",
    ("methods/catalog.py", "--hflip"): "diffusers' train_custom_diffusion.py flag in its recipe's source",
}
# backticked names in library messages that the command line has no flag for, each with why
NO_FLAG = {
    "min_crop": "TrainConfig field set only from Python; the CLI shows its bare name",
    "adam_weight_decay": "TrainConfig field set only from Python; the CLI shows its bare name",
}


def library_strings() -> Iterator[tuple[str, int, str]]:
    """(module, line, text) of every string constant in the library's code, f-string parts included,
    docstrings left out; the front ends' modules are not the library."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module.startswith(FRONT_ENDS):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(doc) for doc in docstring_nodes(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                yield module, node.lineno, node.value


def docstring_nodes(tree: ast.Module) -> Iterator[ast.Constant]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                yield first.value


def test_the_walk_sees_the_library() -> None:
    modules = {module for module, _, _ in library_strings()}
    assert {"config.py", "training/train.py", "formats/runfolder.py", "app/common.py"} <= modules
    assert not any(module.startswith(FRONT_ENDS) for module in modules)


def test_library_messages_name_no_command_line_flags() -> None:
    found = [
        f"{module}:{line}: {flag}"
        for module, line, text in library_strings()
        for flag in FLAG.findall(text)
        if (module, flag) not in CITED_FLAGS
    ]
    assert not found, "name the setting in backticks (`steps`), not its flag:\n" + "\n".join(found)


def test_every_setting_a_message_names_has_a_flag() -> None:
    unknown = sorted(
        f"{module}:{line}: `{name}`"
        for module, line, text in library_strings()
        for name in SETTING.findall(text)
        if name not in FLAGS and name not in NO_FLAG
    )
    assert not unknown, "add these to persres.cli.flags.FLAGS (or NO_FLAG, with why):\n" + "\n".join(unknown)


def command_line_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string and positional name of every subcommand."""
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= command_line_names(sub)
        elif action.option_strings:
            names |= set(action.option_strings)
        else:
            names.add(str(action.metavar or action.dest))
    return names


def test_the_table_names_real_flags() -> None:
    missing = {
        setting: flag for setting, flag in FLAGS.items() if flag not in command_line_names(build_parser())
    }
    assert not missing, f"no command takes these: {missing}"


def test_for_command_line_replaces_settings_by_flags() -> None:
    message = "`out` run already holds a training run; pass `resume`, `class_word` or `min_crop`"
    assert for_command_line(message) == (
        "--out run already holds a training run; pass --resume, --class-word or min_crop"
    )
    assert for_command_line("prompt `a photo of a dog` kept") == "prompt `a photo of a dog` kept"


def test_cli_log_lines_name_flags() -> None:
    record = logging.LogRecord(
        "persres.training.trainsetup", logging.WARNING, "", 0, "`resume`: no checkpoint in %s", ("run",), None
    )
    assert FlagNames().filter(record)
    assert record.getMessage() == "--resume: no checkpoint in run"


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_cli_errors_name_flags(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    err = error_of(capsys, train_argv(conv_base, photos, run, "--resume", "--overwrite"))
    assert "--resume and --overwrite contradict each other" in err and "`" not in err
    err = error_of(capsys, train_argv(conv_base, photos, photos / "run"))
    assert f"--out {photos / 'run'} would be inside --images {photos}" in err
    assert "choose another --out" in err


def test_cli_error_from_deep_in_training_names_flags(
    conv_base: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(train_argv(conv_base, photos, run, "--checkpoint-every", "1")) == 0
    capsys.readouterr()  # the training's progress bar
    err = error_of(capsys, train_argv(conv_base, photos, run, "--steps", "1", "--resume"))
    assert "is at step 2, past --steps 1; raise --steps" in err, err


def test_the_app_shows_its_labels() -> None:
    pytest.importorskip("gradio")
    from persres.app.common import shown

    error = shown(ConfigError("`class_word` must not be empty; `min_crop` too"), "training")
    assert error.message == "class word must not be empty; min_crop too"
    with pytest.raises(ConfigError, match="`steps` must be >= 1") as caught:
        from persres.app.jobs import TOY_RECIPE, make_config

        make_config("b", Path("p"), "dog", "sks", 0, 5e-3, "0.05", TOY_RECIPE)
    assert shown(caught.value, "training").message == "steps must be >= 1, got 0"
