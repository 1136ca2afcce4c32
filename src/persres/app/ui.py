"""The gradio page: Train, Sample and Runs tabs over ``persres.app.jobs``. Imported by ``persres app``
only (gradio is an optional extra). Every handler is wrapped by ``common.refused``: its number fields are
range-checked first (``fields``), a ``PersresError`` becomes a ``gr.Error`` the page shows as a message, and
any other error one short line (its traceback in the server's log); the server keeps serving.

Heavy events (train, resume, sample) share one queue slot (``concurrency_id="machine"``): they run one
at a time and the page shows a waiting job its place in line. Light ones (previews, lists) never wait."""

from __future__ import annotations

import functools

import gradio as gr

from persres.app.common import LIGHT, AppSettings, refused
from persres.app.jobs import base_label
from persres.app.runs_page import run_lists, runs_tab
from persres.app.sample_page import sample_tab
from persres.app.train_page import train_tab

__all__ = ["AppSettings", "build", "launch"]


def build(settings: AppSettings) -> gr.Blocks:
    with gr.Blocks(title="persres") as page:
        gr.Markdown(
            "# persres: Personalized Residuals\nTeach the model a concept from 3-15 photos, then sample it "
            "with normal sampling and with LAG (residuals only where the concept is). "
            f"{base_names(settings.bases)}."
        )
        with gr.Tab("Train"):
            train_tab(settings)
        with gr.Tab("Sample") as sample_page:
            sample_choice = sample_tab(settings)
        with gr.Tab("Runs") as runs_page:
            lists = [sample_choice, *runs_tab(settings)]
        refresh = refused(functools.partial(run_lists, settings))
        for trigger in (page.load, sample_page.select, runs_page.select):  # new runs show up in both pages
            trigger(refresh, None, lists, **LIGHT, api_visibility="undocumented")
    return page


def base_names(bases: tuple[str, ...]) -> str:
    if len(bases) == 1:
        return f"Base model: {base_label(bases[0])}"
    return "Base models (chosen on the Train page): " + "; ".join(base_label(b) for b in bases)


def launch(
    settings: AppSettings, host: str, port: int, auth: tuple[str, str] | None, block: bool = True
) -> gr.Blocks:
    """Serve the page; ``block=False`` returns at once (tests)."""
    settings.runs.mkdir(parents=True, exist_ok=True)
    page = build(settings)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        prevent_thread_lock=not block,
        allowed_paths=[str(settings.runs)],
        max_file_size="20mb",
        show_error=False,  # a gr.Error (all that handlers raise: common.refused) is shown all the same
        quiet=not block,
    )
    return page
