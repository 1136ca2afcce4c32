"""Pictures the page shows: the live loss curve, and small images enlarged so their pixels show."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

SHOWN_SIDE = 256  # small images (the toy world's 32 px) are enlarged to at least this for the page


def enlarged(image: Image.Image) -> Image.Image:
    scale = max(1, -(-SHOWN_SIDE // min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def loss_image(rows: list[tuple[int, float]], steps: int) -> Image.Image:
    """Loss against the step, the x axis spanning the whole run so the curve grows to the right."""
    # Figure + Agg canvas directly, as persres.training.trainlog: no pyplot global state in a server
    figure = Figure(figsize=(7, 2.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([r[0] for r in rows], [r[1] for r in rows], color="tab:orange", linewidth=1.2)
    axes.set(xlabel="step", ylabel="denoising loss", xlim=(0, max(steps, 1)))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
