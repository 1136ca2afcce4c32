"""Errors a user can fix. The CLI prints the message and exits with status 2.

Each message names the culprit (file, layer, setting) and says how to fix it. A setting is named by
its field or parameter name in backticks, as a library user writes it: "`steps` must be >= 1, got 0",
"choose another `out`, or pass `overwrite`". The front ends show those names in their own words
(``with_names``): the command line as flags (``persres.cli.flags``: "--steps"), the web app as its
fields' labels (``persres.app.fields``). A library user reads the backticked names as they are.
"""

import re
from collections.abc import Mapping


class PersresError(Exception):
    """Base of every error caused by input the user can correct."""


class ConfigError(PersresError, ValueError):
    """A setting out of range or inconsistent with another."""


class InputError(PersresError):
    """A missing, empty or unreadable input file or folder."""


class ModelError(PersresError):
    """A base model that cannot be found or is not a Stable Diffusion pipeline."""


class ResidualFileError(PersresError):
    """A residual file that is not safetensors, or does not fit the model it is loaded into."""


class OutputExistsError(PersresError, FileExistsError):
    """An output that would overwrite an earlier result."""


class TrainingDivergedError(PersresError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


class OutputPathError(PersresError):
    """An output path that cannot be written (a file where a folder is needed, no permission)."""


class RunLockedError(OutputExistsError):
    """A training run folder in use by another running ``train``."""


SETTING = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")  # a backticked setting name in a message: `class_word`


def with_names(message: str, names: Mapping[str, str]) -> str:
    """``message`` with each backticked setting replaced by what a front end calls it (``names``); a
    setting ``names`` does not know is left bare, without its backticks."""
    return SETTING.sub(lambda found: names.get(found.group(1), found.group(1)), message)


QUOTE_LIMIT = 60


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a user string for an error message, cut to its first ``limit`` characters.

    A message repeats the culprit, and a prompt or a file line may be kilobytes long: quoting at
    most about 80 characters keeps every error one readable line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A third-party exception's first line, cut to ``limit`` characters: torch's and diffusers' load
    errors list every mismatched tensor over hundreds of lines."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else f"{text[:limit]}..."
