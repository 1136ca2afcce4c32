"""The toy world's six backgrounds, each with a distinct colour layout (checked by the oracle's
border-colour test): sky over sand and sea, snow under a grey sky, dark forest with trunks, grey
city with lit windows, bright grass under blue sky, a plain studio wall and floor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS = ("beach", "snow", "forest", "city", "grass", "studio")

Colour = tuple[int, int, int]


def _jitter(colour: Colour, rng: np.random.Generator, amount: int = 10) -> Colour:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return (r, g, b)


def _horizon(rng: np.random.Generator, size: int, centre: float) -> int:
    return int(size * (centre + rng.uniform(-0.06, 0.06)))


def _beach(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    h = _horizon(rng, size, 0.38)
    draw.rectangle((0, 0, size, h), fill=_jitter((135, 200, 240), rng))
    draw.rectangle((0, h, size, h + size // 7), fill=_jitter((30, 110, 190), rng))
    draw.rectangle((0, h + size // 7, size, size), fill=_jitter((235, 215, 160), rng))


def _snow(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    h = _horizon(rng, size, 0.45)
    draw.rectangle((0, 0, size, h), fill=_jitter((190, 200, 215), rng))
    for _ in range(2):
        peak = rng.uniform(0, size)
        width = rng.uniform(0.3, 0.6) * size
        draw.polygon([(peak - width, h), (peak, h - 0.25 * size), (peak + width, h)], fill=(150, 158, 175))
    draw.rectangle((0, h, size, size), fill=_jitter((250, 250, 252), rng, 3))


def _forest(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    draw.rectangle((0, 0, size, size), fill=_jitter((25, 80, 35), rng))
    for _ in range(4):
        x = rng.uniform(0, size)
        draw.rectangle((x, 0, x + size / 14, size), fill=_jitter((90, 60, 30), rng))
    for _ in range(5):
        x, y = rng.uniform(0, size), rng.uniform(0, 0.4 * size)
        r = rng.uniform(0.08, 0.16) * size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter((45, 115, 45), rng))


def _city(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    draw.rectangle((0, 0, size, size), fill=_jitter((170, 170, 180), rng))
    x = 0.0
    while x < size:
        w = rng.uniform(0.15, 0.3) * size
        top = rng.uniform(0.05, 0.35) * size
        draw.rectangle((x, top, x + w - 2, size), fill=_jitter((70, 70, 85), rng))
        for wy in np.arange(top + 6, size - 8, size / 10):
            for wx in np.arange(x + 5, x + w - 10, size / 10):
                draw.rectangle((wx, wy, wx + 5, wy + 6), fill=(240, 210, 90))
        x += w
    draw.rectangle((0, 0.88 * size, size, size), fill=(95, 95, 95))


def _grass(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    h = _horizon(rng, size, 0.33)
    draw.rectangle((0, 0, size, h), fill=_jitter((100, 170, 250), rng))
    draw.rectangle((0, h, size, size), fill=_jitter((110, 205, 70), rng))
    for _ in range(25):
        x, y = rng.uniform(0, size), rng.uniform(h, size)
        draw.line((x, y, x + 2, y - size / 20), fill=(70, 160, 50), width=2)


def _studio(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    h = _horizon(rng, size, 0.7)
    draw.rectangle((0, 0, size, h), fill=_jitter((222, 215, 205), rng))
    draw.rectangle((0, h, size, size), fill=_jitter((175, 165, 155), rng))


_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, int, np.random.Generator], None]] = {
    "beach": _beach,
    "snow": _snow,
    "forest": _forest,
    "city": _city,
    "grass": _grass,
    "studio": _studio,
}


def draw_background(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    if name not in _PAINTERS:
        raise ValueError(f"unknown background {name!r}; choose from {', '.join(BACKGROUNDS)}")
    canvas = Image.new("RGB", (size, size))
    _PAINTERS[name](ImageDraw.Draw(canvas), size, rng)
    return canvas
