"""The Train page: photos (checked as they are uploaded), class word, identifier, advanced settings;
the live progress and loss curve."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from persres.app import jobs
from persres.app.common import HEAVY, LIGHT, AppSettings, follow, refused, refused_stream
from persres.app.fields import labelled, number_field
from persres.app.photos import MAX_PHOTOS, MIN_PHOTOS, check_photo, shown_name
from persres.errors import PersresError
from persres.ranges import LEARNING_RATE, integer

EXAMPLE = ("dog", "red", "striped")  # a toy-world concept the base model has never seen (scripts/demo.sh)
STEPS = integer(1, 1000)  # a page's training takes minutes, not hours (train --steps is unbounded)


def train_tab(settings: AppSettings) -> None:
    recipe = jobs.recipe_for(settings.base)
    base = gr.Dropdown(
        choices=[(jobs.base_label(b), b) for b in settings.bases],
        value=settings.base,
        label="base model",
        visible=len(settings.bases) > 1,
        elem_id="base",
    )
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
            thumbs = gr.Gallery(
                label="photos kept", columns=5, height=220, object_fit="contain", elem_id="thumbs"
            )
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
            steps = number_field("steps", STEPS, recipe.steps, elem_id="steps")
            lr = number_field("learning rate", LEARNING_RATE, recipe.lr)
            rank = gr.Textbox(label="rank (0.05 = 5% of each layer; 16 = fixed)", value=str(recipe.rank))
            buckets = gr.Checkbox(
                label="keep each photo's aspect ratio (buckets) instead of square crops",
                value=False,
                elem_id="buckets",
            )
            masked = gr.Checkbox(
                label="learn the concept, not its background: the loss only where the model's attention puts "
                "the class word (mask attention-trained; no extra time per step)",
                value=recipe.masked,
                elem_id="mask-attention",
            )
    start = gr.Button("Train", variant="primary", elem_id="train")
    state = gr.Markdown(elem_id="train-status")
    curve = gr.Image(label="loss", type="pil", format="png", height=260, elem_id="loss")
    photos.change(refused(preview), [photos], [thumbs, checked], **LIGHT, api_name="preview")
    example.click(
        refused(functools.partial(example_photos, settings)),
        None,
        [photos, class_word, name],
        **LIGHT,
        api_name="example",
    )
    chosen = [base]
    fields = refused(functools.partial(recipe_fields, settings), chosen)
    base.change(fields, chosen, [steps, lr, rank, masked], **LIGHT, api_name="recipe")
    asked = [photos, class_word, token, name, steps, lr, rank, buckets, masked, base]
    handler = refused_stream(functools.partial(train, settings), asked)
    start.click(handler, asked, [state, curve], **HEAVY, api_name="train")


def recipe_fields(settings: AppSettings, base: str) -> tuple[Any, Any, Any, Any]:
    """The advanced fields' values for ``base`` (its recipe: the toy world's, or the paper's with the
    base family's rank)."""
    recipe = jobs.recipe_for(settings.served_base(base))
    return (
        gr.update(value=recipe.steps),
        gr.update(value=recipe.lr),
        gr.update(value=str(recipe.rank)),
        gr.update(value=recipe.masked),
    )


def preview(files: list[str] | None) -> tuple[list[tuple[str, str]], str]:
    """Thumbnails of the photos that decode, and the refused ones by name."""
    kept, notes = [], []
    for path in files or []:
        try:
            check_photo(Path(path))
            kept.append((path, shown_name(path)))
        except PersresError as exc:
            notes.append(f"- refused: {labelled(str(exc))}")
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
    from persres.evaluation.evaluate import Scorers
    from persres.evaluation.macro import load_nouns, suggest_classes

    with tempfile.TemporaryDirectory(dir=settings.runs) as tmp:
        keep_photos(files or [], Path(tmp) / "photos")
        scorers = Scorers.load(str(settings.clip), None, settings.device)
        nouns = load_nouns(settings.nouns) if settings.nouns else None
        found = suggest_classes(scorers, Path(tmp) / "photos", top=5, nouns=nouns, progress=False)
    return gr.update(value=found[0].noun, info="suggested: " + ", ".join(s.noun for s in found))


def train(
    settings: AppSettings,
    files: list[str] | None,
    class_word: str,
    token: str,
    name: str,
    steps: int,
    lr: float,
    rank: str,
    buckets: bool = False,
    masked: bool = False,
    base: str | None = None,
    progress: gr.Progress = gr.Progress(),
) -> Iterator[tuple[str, Image.Image]]:
    """``steps`` and ``lr`` come checked by their fields; ``rank`` is checked before anything is kept.
    ``buckets``: aspect-ratio buckets (the uploads keep their shape, shrunk to 1024 px at most). Caption
    files are not offered here: the app keeps uploads under names of its own and reads only photos.
    ``masked``: `mask` attention-trained (masks from files are not offered: the uploads are re-encoded as
    RGB, and a second upload of masks would have to be paired with the photos by name). ``base``: one of
    the app's (``settings.bases``), its first when none is given."""
    job = jobs.start_training(
        settings.runs,
        name,
        files or [],
        settings.served_base(base),
        class_word,
        token,
        steps,
        lr,
        rank,
        settings.device,
        buckets=bool(buckets),
        masked=bool(masked),
    )
    yield from follow(job, progress)
