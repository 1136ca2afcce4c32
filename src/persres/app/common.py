"""What the app's pages share: the settings, the queue slots, and how errors and a training's
progress reach the page."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from persres.app import jobs
from persres.app.fields import checked_args, labelled, rules_of
from persres.app.figures import loss_image
from persres.errors import ConfigError, PersresError

log = logging.getLogger(__name__)
# Heavy events (train, resume, sample) share one queue slot: one at a time, the others wait in line with
# their place shown. Light ones (previews, lists, downloads) never wait behind them.
HEAVY: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "machine"}
LIGHT: dict[str, Any] = {"concurrency_limit": None}


@dataclass(frozen=True)
class AppSettings:
    base: str  # the Train page's base model at first
    runs: Path
    device: str = "auto"
    clip: str | None = None  # a CLIP model for class-word suggestions; none: the button is hidden
    nouns: str | None = None  # the nouns suggested from (one per line); none: WordNet's, as suggest-class
    others: tuple[str, ...] = ()  # the other base models the Train page offers

    @property
    def bases(self) -> tuple[str, ...]:
        """Every base model the app trains on, ``base`` first."""
        return tuple(dict.fromkeys((self.base, *self.others)))

    def served_base(self, base: str | None) -> str:
        """``base`` if this app trains on it (``base`` when none is given); any other is refused by name
        (the page's list holds only these: another is an API call's)."""
        if not base:
            return self.base
        if base not in self.bases:
            served = ", ".join(self.bases)
            raise ConfigError(f"base model {base!r} is not one this app serves; choose one of {served}")
        return base


def refused(handler: Callable[..., Any], inputs: Sequence[Any] = ()) -> Callable[..., Any]:
    """``handler`` for an event with these ``inputs``: its number fields' values checked (``fields``), and
    any error shown in the page as a message (``shown``); the server keeps serving."""
    rules = rules_of(inputs)

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*checked_args(rules, args), **kwargs)
        except Exception as exc:
            raise shown(exc, what(handler)) from None

    wrapped.refuses = True  # type: ignore[attr-defined]  # tests check that every event handler is wrapped
    return wrapped


def refused_stream(
    handler: Callable[..., Iterator[Any]], inputs: Sequence[Any] = ()
) -> Callable[..., Iterator[Any]]:
    """``refused`` for a handler that reports as it goes (a generator)."""
    rules = rules_of(inputs)

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from handler(*checked_args(rules, args), **kwargs)
        except Exception as exc:
            raise shown(exc, what(handler)) from None

    wrapped.refuses = True  # type: ignore[attr-defined]
    return wrapped


def shown(exc: BaseException, doing: str) -> gr.Error:
    """What the page says of ``exc``: a ``PersresError`` or file error as it is (the user can fix it), a
    ``gr.Error`` as raised, anything else (a bug) one short line, its traceback in the server's log.
    The settings a library message names are shown by the page's labels."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (PersresError, OSError)):
        return gr.Error(labelled(str(exc)), print_exception=False)
    log.error("persres app: %s failed", doing, exc_info=exc)
    return gr.Error(
        f"{doing} failed with an unexpected {type(exc).__name__}; the server's log has the details",
        print_exception=False,
    )


def what(handler: Callable[..., Any]) -> str:
    return getattr(getattr(handler, "func", handler), "__name__", "the request").replace("_", " ")


def follow(job: jobs.TrainingJob, progress: gr.Progress) -> Iterator[tuple[str, Image.Image]]:
    """The training's status line and loss curve, live, until it ends."""
    for update in job.updates(poll_s=1.0):
        done = update.losses[-1][0] if update.losses else 0
        progress((done, update.steps), desc=f"training {update.run}", unit="steps")
        if update.error is not None:
            error = shown(update.error, f"training {update.run}")
            raise gr.Error(f"run {update.run}: {error.message}", print_exception=False)
        text = f"**{update.run}**: step {done}/{update.steps}"
        if update.losses:
            text += f", loss {update.losses[-1][1]:.4f}"
        if update.done:
            text += ". Finished: sample it on the Sample page, download it on the Runs page."
        yield text, loss_image(update.losses, update.steps)
