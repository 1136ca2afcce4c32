"""Every numeric option of every command is range-checked when the command line is parsed.

The options are found by walking ``build_parser()``, not listed by hand, so an option added later
without a checked type fails here. An option is numeric when argparse converts it (``type`` is set:
every type persres gives an option is a checked number, ``persres.cli.options``); the others are
text (paths, model ids, prompts) or choices, and must not hide a number behind a numeric default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from persres.cli import build_parser, main

HOSTILE = ["nan", "inf", "-inf", "-1e39", "1e39", "1e20", str(10**20), "-" + str(10**20), "9" * 5000]


def commands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def numeric_options() -> list[tuple[str, str]]:
    return [
        (name, action.option_strings[-1])
        for name, parser in commands().items()
        for action in options(parser)
        if action.type is not None
    ]


def required_argv(parser: argparse.ArgumentParser, tmp_path: Path) -> list[str]:
    """A value for every positional and required option (none of them numeric), all under tmp_path."""
    argv = []
    for action in parser._actions:
        value = str(next(iter(action.choices))) if action.choices else str(tmp_path / action.dest)
        if action.option_strings and action.required:
            argv += [action.option_strings[-1], value]
        elif not action.option_strings and not isinstance(action, argparse._HelpAction):
            argv.append(value)
    return argv


def test_the_walk_finds_the_known_numeric_options() -> None:
    found = set(numeric_options())
    known = {("train", "--steps"), ("train", "--rank"), ("train", "--prior-images"), ("export", "--scale")}
    known |= {("benchmark", "--rank"), ("sample", "--guidance"), ("app", "--port")}
    known |= {("suggest-class", "--margin"), ("train", "--batch-size")}
    assert known <= found, sorted(known - found)


@pytest.mark.parametrize("command", sorted(commands()))
def test_options_without_a_checked_type_are_not_numbers(command: str) -> None:
    """A text option (type None) with a numeric default would be a number nobody checks."""
    for action in options(commands()[command]):
        if action.type is None and action.nargs != 0:  # nargs 0: flags (store_true, version)
            default = action.default
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            assert not numeric, f"{command} {action.option_strings[-1]}: give it a checked type (cli.options)"
            if default is not None and action.choices is None:
                assert isinstance(default, (str, list)), (command, action.option_strings, default)


@pytest.mark.parametrize(("command", "flag"), numeric_options())
def test_every_numeric_option_refuses_hostile_numbers_when_parsed(
    command: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, *required_argv(commands()[command], tmp_path)]
    for value in HOSTILE:
        assert main([*argv, f"{flag}={value}"]) == 2, (command, flag, value)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {flag}: " in err, (value, err[:300])
        assert len(err) < 500, (value, err[:300])
    assert not any(tmp_path.iterdir())  # nothing was written
