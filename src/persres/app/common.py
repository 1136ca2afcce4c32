"""What the app's pages share: the settings, the queue slots, and how errors and a training's
progress reach the page."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from persres.app import jobs
from persres.app.figures import loss_image
from persres.errors import PersresError

# Heavy events (train, resume, sample) share one queue slot: one at a time, the others wait in line with
# their place shown. Light ones (previews, lists, downloads) never wait behind them.
HEAVY: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "machine"}
LIGHT: dict[str, Any] = {"concurrency_limit": None}


@dataclass(frozen=True)
class AppSettings:
    base: str
    runs: Path
    device: str = "auto"
    clip: str | None = None  # a CLIP model for class-word suggestions; none: the button is hidden
    nouns: str | None = None  # the nouns suggested from (one per line); none: WordNet's, as suggest-class


def refused(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Show a ``PersresError`` (and any file error) in the page instead of failing the request."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except (PersresError, OSError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapped


def refused_stream(handler: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from handler(*args, **kwargs)
        except (PersresError, OSError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapped


def follow(job: jobs.TrainingJob, progress: gr.Progress) -> Iterator[tuple[str, Image.Image]]:
    """The training's status line and loss curve, live, until it ends."""
    for update in job.updates(poll_s=1.0):
        done = update.losses[-1][0] if update.losses else 0
        progress((done, update.steps), desc=f"training {update.run}", unit="steps")
        if update.error is not None:
            if isinstance(update.error, PersresError):
                raise gr.Error(f"run {update.run}: {update.error}", print_exception=False)
            raise gr.Error(f"run {update.run} stopped: {type(update.error).__name__}: {update.error}")
        text = f"**{update.run}**: step {done}/{update.steps}"
        if update.losses:
            text += f", loss {update.losses[-1][1]:.4f}"
        if update.done:
            text += ". Finished: sample it on the Sample page, download it on the Runs page."
        yield text, loss_image(update.losses, update.steps)
