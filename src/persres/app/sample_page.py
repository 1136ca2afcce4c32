"""The Sample page: one or two runs, a prompt (its kind's suggested sampler shown), normal | LAG |
both from the same noise, and LAG's masks over the image per resolution, with a slider over the steps."""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr
from PIL import Image

from persres.app import jobs
from persres.app.common import HEAVY, LIGHT, AppSettings, refused
from persres.app.figures import enlarged
from persres.app.masks import overlays
from persres.categories import prompt_category, sampler_for
from persres.sampling import Sample


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
            step = gr.Slider(
                0, 24, value=24, step=1, label="LAG's masks at denoising step", elem_id="mask-step"
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
