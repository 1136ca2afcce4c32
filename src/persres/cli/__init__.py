"""Command line: parse the arguments (ranges checked as they are read), then make one library call per
subcommand. Each subcommand lives in one module here with its parser and its handler.

Errors the user can fix (``PersresError``, bad arguments) print one line and exit with status 2.
Output read by a program that stops early (``persres info RUN | head``) ends the command quietly with
status 141 (128 + SIGPIPE, what a shell reports for a command killed by a closed pipe).
Commands that only read files (``info``, ``report``, ``--help``, argument errors) never import torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from persres import __version__
from persres.cli import app, evaluation, generation, sharing, suggestion, training
from persres.cli.flags import FlagNames, for_command_line
from persres.errors import PersresError
from persres.quiet import quiet_third_party

LIGHT_COMMANDS = {"info", "report"}  # read files only: no torch, diffusers or transformers


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error that names the subcommand and where help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="persres",
        description="Personalized Residuals for Stable Diffusion: teach a concept from a few photos.",
    )
    parser.add_argument("--version", action="version", version=f"persres {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (training, generation, sharing, evaluation, suggestion, app):
        module.register(commands)
    return parser


BROKEN_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status."""
    try:
        status = run(argv)
        sys.stdout.flush()  # a small output is still buffered: a closed pipe shows here
        return status
    except BrokenPipeError:
        # the reader of stdout has gone: stop quietly, and send what is left in the buffer nowhere, or
        # Python's own flush at exit would report the same error again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


def run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and argument errors have printed their answer
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # the library's log lines name settings; show flags
        if not any(isinstance(f, FlagNames) for f in handler.filters):
            handler.addFilter(FlagNames())
    if args.command not in LIGHT_COMMANDS:
        quiet_third_party()
    try:
        return int(args.handler(args))
    except PersresError as exc:
        print(f"persres {args.command}: error: {for_command_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"persres {args.command}: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
