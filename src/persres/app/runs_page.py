"""The Runs page: the runs in ``--runs`` with their settings, loss curve and validation grids; resume an
interrupted one; download the residual file or a LoRA export."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from persres.app import jobs, runstore
from persres.app.common import HEAVY, LIGHT, AppSettings, follow, refused, refused_stream
from persres.errors import PersresError
from persres.formats.lora_files import FORMATS
from persres.formats.runfolder import RESIDUALS_FILE, loss_plot

RESIDUAL_FILE = "residuals"  # the download choice of the run's own residual file, beside the LoRA formats


def runs_tab(settings: AppSettings) -> Any:
    refresh = gr.Button("refresh")
    table = gr.Dataframe(runs_table(settings), interactive=False, elem_id="runs-table")
    chosen = gr.Dropdown(label="run", allow_custom_value=True, elem_id="run")
    with gr.Row():
        details = gr.JSON(label="settings")
        curve = gr.Image(label="loss", type="filepath")
    grids = gr.Gallery(label="validation images", columns=4, height=200)
    with gr.Row():
        again = gr.Button("resume an interrupted run")
        fmt = gr.Radio([RESIDUAL_FILE, *FORMATS], value="kohya", label="download as")
        fetch = gr.Button("download")
    status = gr.Markdown()
    resumed = gr.Image(label="loss", type="pil", format="png", height=260)
    download = gr.File(label="file", elem_id="download")
    refresh.click(
        refused(functools.partial(run_lists, settings)),
        None,
        [gr.State(), chosen, table],
        **LIGHT,
        api_name="runs",
    )
    chosen.change(
        refused(functools.partial(show_run, settings)),
        [chosen],
        [details, curve, grids],
        **LIGHT,
        api_name="show_run",
    )
    again.click(
        refused_stream(functools.partial(resume, settings)),
        [chosen],
        [status, resumed],
        **HEAVY,
        api_name="resume",
    )
    fetch.click(
        refused(functools.partial(fetch_file, settings)),
        [chosen, fmt],
        [download],
        **LIGHT,
        api_name="download",
    )
    return chosen, table


def resume(settings: AppSettings, name: str, progress: gr.Progress = gr.Progress()) -> Iterator[Any]:
    info = runstore.run_info(runstore.run_folder(settings.runs, name))  # a damaged run: refused, named
    if info.status != "interrupted":
        raise gr.Error(f"run {name} is {info.status}; there is nothing to resume", print_exception=False)
    yield from follow(jobs.resume_training(settings.runs, name, settings.device), progress)


def show_run(settings: AppSettings, name: str | None) -> tuple[Any, Any, Any]:
    if not name:
        return None, None, []
    folder = runstore.run_folder(settings.runs, name)
    info = runstore.run_info(folder)
    config = runstore.run_config(folder).to_dict()
    plot = loss_plot(folder)
    grids = [(str(path), caption) for path, caption in runstore.validation_grids(folder)]
    return (
        {"status": info.status, "steps done": info.steps_done, **config},
        str(plot) if plot else None,
        grids,
    )


def fetch_file(settings: AppSettings, name: str | None, fmt: str) -> str:
    folder = runstore.run_folder(settings.runs, name or "")
    runstore.run_config(folder)  # its settings travel with the file: a damaged config.json is refused
    if fmt == RESIDUAL_FILE:
        path = folder / RESIDUALS_FILE
        if not path.is_file():
            raise gr.Error(f"run {name} has no residual file yet: resume it first", print_exception=False)
        return str(path)
    return str(jobs.export_run(settings.runs, folder.name, fmt))


def run_lists(settings: AppSettings) -> tuple[Any, Any, pd.DataFrame]:
    """The Sample page's finished runs, the Runs page's runs and its table, as they are now."""
    rows = run_rows(settings)
    finished = [row[0] for row in rows if row[1] == "finished"]
    return gr.update(choices=finished), gr.update(choices=[row[0] for row in rows]), table_of(rows)


def runs_table(settings: AppSettings) -> pd.DataFrame:
    return table_of(run_rows(settings))


def run_rows(settings: AppSettings) -> list[list[object]]:
    """One row per run, newest first; a run whose files are damaged is listed as such, not left out."""
    rows = []
    for name in runstore.run_names(settings.runs):
        try:
            rows.append(runstore.run_info(settings.runs / name).row())
        except PersresError as exc:
            rows.append(runstore.damaged_row(name, exc))
    return rows


def table_of(rows: list[list[object]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=runstore.ROW_HEADERS)
