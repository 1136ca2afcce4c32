"""``persres app``: the browser UI (gradio, the optional extra ``persres[app]``), local by default."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from pathlib import Path

from persres.cli.options import integer
from persres.errors import ConfigError, ModelError
from persres.toymodels import TOY_BASE, TOY_BASES, find_toy_model, locate_toy_model

log = logging.getLogger(__name__)

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "app",
        help="a web app: train, sample normal and LAG side by side, export (pip install 'persres[app]')",
        description="Serves a page to personalize a model from photos, sample with and without LAG from the "
        "same noise, list runs and download them as LoRA files. With no arguments: the shipped toy world's "
        "bases, U-Net and Flux-shaped, to choose from (each trains on a CPU in about a minute), runs in "
        "./app-runs, at http://127.0.0.1:7860.",
    )
    p.add_argument(
        "--base",
        action="append",
        default=None,
        help="base model: hub id or folder; repeat it to offer several, the first chosen at first (default: "
        "the shipped toy world's bases)",
    )
    p.add_argument("--runs", default="app-runs", help="folder of the app's runs (default ./app-runs)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=integer(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument(
        "--auth", default=None, metavar="USER:PASSWORD", help="ask for this login (needed off localhost)"
    )
    p.add_argument("--clip", default=None, help="a CLIP model to suggest class words (default: none)")
    p.add_argument(
        "--nouns", default=None, help="with --clip: own noun list (one per line) instead of WordNet"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(handler=run_app)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise ConfigError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


def check_runs(runs: Path) -> None:
    """``--runs`` is a folder or can be made one: no file there, nor in its path."""
    for folder in (runs, *runs.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--runs {runs}: {folder} is a file, not a folder; choose another --runs")


def make_runs(runs: Path) -> None:
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--runs {runs} cannot be made ({exc.strerror or exc}); choose another") from None


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment, before gradio starts: a busy port or a foreign address is one line."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host} is not an address of this machine ({exc})") from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            raise port_error(host, port, exc) from None


def port_error(host: str, port: int, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        why = f"another program already serves on {host}:{port}; choose another --port"
    elif exc.errno == errno.EACCES:
        why = "this user may not serve on it (ports below 1024 need root); choose another --port, e.g. 7860"
    else:
        why = f"cannot serve on {host}:{port} ({exc.strerror or exc}); check --host and --port"
    return ConfigError(f"--port {port}: {why}")


def default_bases() -> list[str]:
    """The shipped toy world's bases (the U-Net's first, then the Flux-shaped one where it is shipped), so
    that a first visit trains and samples on a CPU in a minute or two. Found before gradio and torch
    load: where the toy world is absent (installed without a checkout) the refusal is one line, and
    names ``--base`` as the other way."""
    try:
        first = str(find_toy_model(TOY_BASE))
    except ModelError as exc:
        raise ModelError(f"{exc}; or pass --base (a hub id or a diffusers folder)") from None
    others = [locate_toy_model(name) for name in TOY_BASES if name != TOY_BASE]
    return [first, *(str(path) for path in others if path is not None)]


def run_app(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth)
    runs = Path(args.runs).resolve()
    check_runs(runs)
    bases = list(dict.fromkeys(args.base or default_bases()))
    check_port(args.host, args.port)
    try:
        from persres.app import ui
    except ImportError as exc:
        if exc.name not in ("gradio", "pandas"):
            raise
        raise ConfigError("the app needs gradio: pip install 'persres[app]' (or run make app)") from None

    if args.host not in LOCAL_HOSTS and auth is None:
        log.warning(
            "--host %s serves the app beyond this machine without a login: anyone who reaches it can train "
            "and read your runs; add --auth USER:PASSWORD",
            args.host,
        )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    settings = ui.AppSettings(bases[0], runs, args.device, args.clip, args.nouns, others=tuple(bases[1:]))
    make_runs(runs)  # the last check: nothing is written before the others pass
    print(f"persres app: base {', '.join(bases)}, runs in {settings.runs}, http://{args.host}:{args.port}")
    try:
        ui.launch(settings, args.host, args.port, auth)
    except OSError as exc:  # the port taken since check_port: gradio's "Cannot find empty port"
        raise port_error(args.host, args.port, exc) from None
    return 0
