"""The gradio page: Train, Sample and Runs tabs over ``persres.app.jobs``. Imported by ``persres app``
only (gradio is an optional extra). Every handler turns a ``PersresError`` into ``gr.Error``, which the
page shows as a message; the server keeps serving.

Heavy events (train, resume, sample) share one queue slot (``concurrency_id="machine"``): they run one
at a time and the page shows a waiting job its place in line. Light ones (previews, lists) never wait.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from persres.app import jobs, runstore
from persres.app.masks import overlays
from persres.app.photos import MAX_PHOTOS, MIN_PHOTOS, check_photo, shown_name
from persres.categories import prompt_category, sampler_for
from persres.errors import PersresError
from persres.runfolder import RESIDUALS_FILE
from persres.sampling import Sample

HEAVY: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "machine"}
LIGHT: dict[str, Any] = {"concurrency_limit": None}
EXAMPLE = ("dog", "red", "striped")  # a toy-world concept the base model has never seen (scripts/demo.sh)
SHOWN_SIDE = 256  # small images (the toy world's 32 px) are enlarged to this for the page


@dataclass(frozen=True)
class AppSettings:
    base: str
    runs: Path
    device: str = "auto"
    clip: str | None = None  # a CLIP model for class-word suggestions; none: the button is hidden


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


def enlarged(image: Image.Image) -> Image.Image:
    scale = max(1, -(-SHOWN_SIDE // min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def loss_frame(rows: list[tuple[int, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "loss"])


def follow(job: jobs.TrainingJob, progress: gr.Progress) -> Iterator[tuple[str, pd.DataFrame]]:
    """The training's status line and loss curve, live, until it ends."""
    for update in job.updates():
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
        yield text, loss_frame(update.losses)


def run_choices(settings: AppSettings) -> tuple[Any, Any]:
    names = runstore.run_names(settings.runs)
    finished = [n for n in names if runstore.status(settings.runs / n) == "finished"]
    return gr.update(choices=finished), gr.update(choices=names)


def runs_table(settings: AppSettings) -> pd.DataFrame:
    rows = []
    for name in runstore.run_names(settings.runs):
        try:
            rows.append(runstore.run_info(settings.runs / name).row())
        except (PersresError, OSError, ValueError):
            rows.append([name, "unreadable", "", "", ""])
    return pd.DataFrame(rows, columns=runstore.ROW_HEADERS)


def build(settings: AppSettings) -> gr.Blocks:
    with gr.Blocks(title="persres") as page:
        gr.Markdown(
            "# persres: Personalized Residuals\nTeach the model a concept from 3-15 photos, then sample it "
            "with normal sampling and with LAG (residuals only where the concept is). "
            f"Base model: `{settings.base}`"
        )
        with gr.Tab("Train"):
            train_tab(settings)
        with gr.Tab("Sample"):
            sample_choice = sample_tab(settings)
        with gr.Tab("Runs"):
            run_choice = runs_tab(settings)
        page.load(
            functools.partial(run_choices, settings),
            outputs=[sample_choice, run_choice],
            **LIGHT,
            api_visibility="undocumented",
        )
    return page


def train_tab(settings: AppSettings) -> None:
    recipe = jobs.recipe_for(settings.base)
    with gr.Row():
        with gr.Column():
            photos = gr.File(
                label=f"photos of your concept ({MIN_PHOTOS}-{MAX_PHOTOS})",
                file_count="multiple",
                type="filepath",
                elem_id="photos",
            )
            example = gr.Button(
                "Try an example: 5 photos of a red striped dog (toy world)", elem_id="example"
            )
        with gr.Column():
            thumbs = gr.Gallery(label="photos kept", columns=5, height=220, elem_id="thumbs")
            checked = gr.Markdown(elem_id="checked")
    with gr.Row():
        class_word = gr.Textbox(label="class word (what it is: dog, mug, sofa)", elem_id="class-word")
        token = gr.Textbox(label="identifier (a rare word; V* in prompts)", value="sks", elem_id="token")
        name = gr.Textbox(label="run name (optional)", elem_id="run-name")
    if settings.clip:
        suggest = gr.Button("suggest a class word (CLIP)")
        suggest.click(
            refused(functools.partial(suggest_class, settings)),
            [photos],
            [class_word],
            **HEAVY,
            api_name="suggest_class",
        )
    with gr.Accordion("advanced", open=False):
        with gr.Row():
            steps = gr.Number(
                label="steps", value=recipe.steps, precision=0, minimum=1, maximum=1000, elem_id="steps"
            )
            lr = gr.Number(label="learning rate", value=recipe.lr, minimum=0, maximum=1)
            rank = gr.Textbox(label="rank (0.05 = 5% of each layer; 16 = fixed)", value=str(recipe.rank))
    start = gr.Button("Train", variant="primary", elem_id="train")
    state = gr.Markdown(elem_id="train-status")
    curve = gr.LinePlot(x="step", y="loss", label="loss", height=260, elem_id="loss")
    photos.change(refused(preview), [photos], [thumbs, checked], **LIGHT, api_name="preview")
    example.click(
        refused(functools.partial(example_photos, settings)),
        None,
        [photos, class_word, name],
        **LIGHT,
        api_name="example",
    )
    handler = refused_stream(functools.partial(train, settings))
    start.click(
        handler, [photos, class_word, token, name, steps, lr, rank], [state, curve], **HEAVY, api_name="train"
    )


def preview(files: list[str] | None) -> tuple[list[tuple[str, str]], str]:
    """Thumbnails of the photos that decode, and the refused ones by name."""
    kept, notes = [], []
    for path in files or []:
        try:
            check_photo(Path(path))
            kept.append((path, shown_name(path)))
        except PersresError as exc:
            notes.append(f"- refused: {exc}")
    count = f"{len(kept)} photo(s) ready" + (
        "" if MIN_PHOTOS <= len(kept) <= MAX_PHOTOS else f" (train needs {MIN_PHOTOS}-{MAX_PHOTOS})"
    )
    return kept, "\n".join([count, *notes]) if files else ""


def example_photos(settings: AppSettings) -> tuple[list[str], str, str]:
    from persres.toyworld.experiment import reference_photos

    folder = settings.runs / ".examples" / "-".join(EXAMPLE[1:] + EXAMPLE[:1])
    if not folder.is_dir():
        reference_photos(EXAMPLE, folder)
    return [str(p) for p in sorted(folder.glob("*.png"))], EXAMPLE[0], "red-striped-dog"


def suggest_class(settings: AppSettings, files: list[str] | None) -> Any:
    import tempfile

    from persres.app.photos import keep_photos
    from persres.evaluate import Scorers
    from persres.macro import suggest_classes

    with tempfile.TemporaryDirectory(dir=settings.runs) as tmp:
        keep_photos(files or [], Path(tmp) / "photos")
        scorers = Scorers.load(str(settings.clip), None, settings.device)
        found = suggest_classes(scorers, Path(tmp) / "photos", top=5, progress=False)
    return gr.update(value=found[0].noun, info="suggested: " + ", ".join(s.noun for s in found))


def train(
    settings: AppSettings,
    files: list[str] | None,
    class_word: str,
    token: str,
    name: str,
    steps: float,
    lr: float,
    rank: str,
    progress: gr.Progress = gr.Progress(),
) -> Iterator[tuple[str, pd.DataFrame]]:
    job = jobs.start_training(
        settings.runs,
        name,
        files or [],
        settings.base,
        class_word,
        token,
        int(steps),
        lr,
        rank,
        settings.device,
    )
    yield from follow(job, progress)


def resume(settings: AppSettings, name: str, progress: gr.Progress = gr.Progress()) -> Iterator[Any]:
    if name and runstore.status(runstore.run_folder(settings.runs, name)) == "finished":
        raise gr.Error(f"run {name} is finished; there is nothing to resume", print_exception=False)
    yield from follow(jobs.resume_training(settings.runs, name, settings.device), progress)


def sample_tab(settings: AppSettings) -> Any:
    chosen = gr.Dropdown(
        label="one or two finished runs (V*, or V1* and V2*)",
        multiselect=True,
        max_choices=2,
        allow_custom_value=True,
        elem_id="sample-runs",
    )
    prompt = gr.Textbox(label="prompt", value="a photo of a V* dog on the beach", elem_id="prompt")
    hint = gr.Markdown(kind_hint("a photo of a V* dog on the beach"), elem_id="hint")
    with gr.Row():
        sampler = gr.Radio(["normal", "lag", "both"], value="both", label="sampler", elem_id="sampler")
        seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
        steps = gr.Number(label="denoising steps", value=25, precision=0, minimum=1, maximum=1000)
    go = gr.Button("Sample", variant="primary", elem_id="sample")
    results = gr.Gallery(label="same noise: normal | LAG", columns=2, height=300, elem_id="results")
    step = gr.Slider(0, 24, value=24, step=1, label="LAG's masks at denoising step", elem_id="mask-step")
    masks = gr.Gallery(
        label="where LAG applied the residuals, per U-Net resolution (red: V1*, blue: V2*)",
        columns=4,
        height=300,
        elem_id="masks",
    )
    kept = gr.State()
    prompt.change(kind_hint, [prompt], [hint], **LIGHT, api_name="hint")
    go.click(
        refused(functools.partial(draw, settings)),
        [chosen, prompt, sampler, seed, steps],
        [results, masks, step, kept],
        **HEAVY,
        api_name="sample",
    )
    step.release(mask_page, [kept, step], [masks], **LIGHT, api_visibility="undocumented")
    return chosen


def kind_hint(prompt: str) -> str:
    kind = prompt_category(prompt)
    suggested = "LAG" if sampler_for(kind) == "lag" else "normal"
    return f"prompt kind: **{kind.replace('_', ' ')}**; suggested sampler: **{suggested}** (`--sampler auto`)"


def draw(
    settings: AppSettings, names: list[str] | str | None, prompt: str, sampler: str, seed: float, steps: float
) -> tuple[Any, Any, Any, list[Sample]]:
    chosen = [names] if isinstance(names, str) else list(names or [])
    samples = jobs.sample_runs(
        settings.runs, chosen, settings.base, prompt, sampler, int(seed), int(steps), settings.device
    )
    shown = [(enlarged(s.image), "LAG" if s.sampler == "lag" else "normal") for s in samples]
    last = int(steps) - 1
    return shown, mask_page(samples, last), gr.update(maximum=last, value=last), samples


def mask_page(samples: list[Sample] | None, step: float) -> list[tuple[Image.Image, str]]:
    return [shown for s in samples or [] if s.masks for shown in overlays(s, int(step))]


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
        fmt = gr.Radio(["residuals", "kohya", "diffusers"], value="kohya", label="download as")
        fetch = gr.Button("download")
    status = gr.Markdown()
    resumed = gr.LinePlot(x="step", y="loss", label="loss", height=200)
    download = gr.File(label="file", elem_id="download")
    refresh.click(functools.partial(runs_table, settings), None, [table], **LIGHT, api_name="runs").then(
        functools.partial(run_choices, settings),
        None,
        [gr.State(), chosen],
        **LIGHT,
        api_visibility="undocumented",
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
    return chosen


def show_run(settings: AppSettings, name: str | None) -> tuple[Any, Any, Any]:
    if not name:
        return None, None, []
    folder = runstore.run_folder(settings.runs, name)
    info = runstore.run_info(folder)
    config = runstore.run_config(folder).to_dict()
    plot = runstore.loss_plot(folder)
    grids = [(str(path), caption) for path, caption in runstore.validation_grids(folder)]
    return (
        {"status": info.status, "steps done": info.steps_done, **config},
        str(plot) if plot else None,
        grids,
    )


def fetch_file(settings: AppSettings, name: str | None, fmt: str) -> str:
    folder = runstore.run_folder(settings.runs, name or "")
    if fmt == "residuals":
        path = folder / RESIDUALS_FILE
        if not path.is_file():
            raise gr.Error(f"run {name} has no residual file yet: resume it first", print_exception=False)
        return str(path)
    return str(jobs.export_run(settings.runs, folder.name, fmt))


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
        show_error=True,
        quiet=not block,
    )
    return page
