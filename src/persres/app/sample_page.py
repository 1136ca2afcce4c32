"""The Sample page: one or two runs, a prompt (its kind's suggested sampler shown), normal | LAG |
both from the same noise, and LAG's masks over the image per resolution, with a slider over the steps."""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr
from PIL import Image

from persres.app import jobs
from persres.app.common import HEAVY, LIGHT, AppSettings, refused
from persres.app.fields import number_field, slider_field
from persres.app.figures import enlarged
from persres.app.masks import overlays
from persres.config import MAX_STEPS
from persres.evaluation.categories import prompt_category, sampler_for
from persres.inference.sampling import Sample
from persres.ranges import SEED, STEPS, integer

MASK_STEP = integer(0, MAX_STEPS - 1)  # the slider's step index; shown up to the sampling's last step


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
        seed = number_field("seed", SEED, 0)
        steps = number_field("denoising steps", STEPS, 25)
    go = gr.Button("Sample", variant="primary", elem_id="sample")
    with gr.Row():
        with gr.Column():
            results = gr.Gallery(
                label="same noise: normal | LAG",
                columns=2,
                height=300,
                object_fit="contain",
                elem_id="results",
            )
        with gr.Column():
            masks = gr.Gallery(
                label="where LAG applied the residuals, per U-Net resolution (red: V1*, blue: V2*)",
                columns=2,
                height=300,
                object_fit="contain",
                elem_id="masks",
            )
            step = slider_field("LAG's masks at denoising step", MASK_STEP, 0, 24, 24, elem_id="mask-step")
    kept = gr.State()
    prompt.change(refused(kind_hint), [prompt], [hint], **LIGHT, api_name="hint")
    asked = [chosen, prompt, sampler, seed, steps]
    go.click(
        refused(functools.partial(draw, settings), asked),
        asked,
        [results, masks, step, kept],
        **HEAVY,
        api_name="sample",
    )
    shown = [kept, step]
    step.release(refused(mask_page, shown), shown, [masks], **LIGHT, api_visibility="undocumented")
    return chosen


def kind_hint(prompt: str) -> str:
    kind = prompt_category(prompt)
    suggested = "LAG" if sampler_for(kind) == "lag" else "normal"
    return f"prompt kind: **{kind.replace('_', ' ')}**; suggested sampler: **{suggested}** (sampler auto)"


def draw(
    settings: AppSettings, names: list[str] | str | None, prompt: str, sampler: str, seed: int, steps: int
) -> tuple[Any, Any, Any, list[Sample]]:
    """``seed`` and ``steps`` come checked by their fields."""
    chosen = [names] if isinstance(names, str) else list(names or [])
    samples = jobs.sample_runs(settings.runs, chosen, prompt, sampler, seed, steps, settings.device)
    shown = [(enlarged(s.image), "LAG" if s.sampler == "lag" else "normal") for s in samples]
    last = steps - 1
    return shown, mask_page(samples, last), gr.update(maximum=last, value=last), samples


def mask_page(samples: list[Sample] | None, step: int) -> list[tuple[Image.Image, str]]:
    return [shown for s in samples or [] if s.masks for shown in overlays(s, step)]
