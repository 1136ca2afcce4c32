"""Silhouettes of the toy world's object classes and second objects, drawn with PIL.

Each class is a handful of filled primitives in a unit box (u, v in [0, 1], v downwards), chosen so
the eight families differ in outline even at 32x32: a dog is long with legs and a head on the
right, a cat sits with pointed ears, a teddy bear is all circles, a car is wide with black wheels.
Parts named ``body`` take the instance's colour and pattern; ``shade`` parts a darker body colour;
``black`` parts are always black (wheels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import ImageDraw

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Part:
    kind: str  # "ellipse" | "rect" | "poly" | "ring" | "rounded"
    points: tuple[float, ...]  # unit-box coordinates (x, y, x, y, ...)
    layer: str = "body"  # "body" | "shade" | "black"


def _e(*p: float, layer: str = "body") -> Part:
    return Part("ellipse", p, layer)


def _r(*p: float, layer: str = "body") -> Part:
    return Part("rect", p, layer)


def _p(*p: float, layer: str = "body") -> Part:
    return Part("poly", p, layer)


CLASS_PARTS: dict[str, tuple[Part, ...]] = {
    "dog": (
        _e(0.08, 0.30, 0.74, 0.72),
        _e(0.58, 0.02, 0.98, 0.44),
        _r(0.14, 0.55, 0.27, 1.0),
        _r(0.52, 0.55, 0.65, 1.0),
        _p(0.12, 0.45, 0.0, 0.12, 0.08, 0.1, 0.2, 0.4),
        _e(0.62, 0.0, 0.74, 0.28, layer="shade"),
    ),
    "cat": (
        _e(0.18, 0.40, 0.82, 1.0),
        _e(0.22, 0.08, 0.78, 0.55),
        _p(0.22, 0.28, 0.24, 0.0, 0.46, 0.14),
        _p(0.54, 0.14, 0.76, 0.0, 0.78, 0.28),
        _e(0.72, 0.78, 1.0, 0.98),
    ),
    "cup": (
        _p(0.05, 0.12, 0.72, 0.12, 0.66, 0.98, 0.11, 0.98),
        Part("ring", (0.55, 0.28, 0.98, 0.78)),
        _r(0.05, 0.12, 0.72, 0.2, layer="shade"),
    ),
    "car": (
        _r(0.0, 0.42, 1.0, 0.8),
        _p(0.18, 0.44, 0.3, 0.1, 0.7, 0.1, 0.86, 0.44),
        _e(0.08, 0.64, 0.36, 0.98, layer="black"),
        _e(0.64, 0.64, 0.92, 0.98, layer="black"),
    ),
    "chair": (
        _r(0.12, 0.0, 0.36, 0.62),
        _r(0.12, 0.5, 0.9, 0.66),
        _r(0.12, 0.6, 0.26, 1.0),
        _r(0.76, 0.6, 0.9, 1.0),
    ),
    "teddybear": (
        _e(0.08, 0.0, 0.36, 0.26),
        _e(0.64, 0.0, 0.92, 0.26),
        _e(0.2, 0.04, 0.8, 0.5),
        _e(0.16, 0.4, 0.84, 1.0),
        _e(0.0, 0.46, 0.3, 0.74),
        _e(0.7, 0.46, 1.0, 0.74),
    ),
    "vase": (
        _p(0.36, 0.04, 0.64, 0.04, 0.6, 0.28, 0.94, 0.56, 0.76, 1.0, 0.24, 1.0, 0.06, 0.56, 0.4, 0.28),
        _r(0.28, 0.0, 0.72, 0.1, layer="shade"),
    ),
    "backpack": (
        Part("rounded", (0.1, 0.16, 0.9, 1.0)),
        Part("ring", (0.3, 0.0, 0.7, 0.34)),
        _r(0.26, 0.58, 0.74, 0.88, layer="shade"),
    ),
}

# (width, height) of each class's box relative to its size: long things are wide, tall things narrow.
CLASS_ASPECT: dict[str, tuple[float, float]] = {
    "dog": (1.0, 0.78),
    "cat": (0.8, 1.0),
    "cup": (0.9, 0.9),
    "car": (1.0, 0.7),
    "chair": (0.75, 1.0),
    "teddybear": (0.9, 1.0),
    "vase": (0.72, 1.0),
    "backpack": (0.8, 1.0),
}


def _to_pixels(points: tuple[float, ...], box: Box) -> list[float]:
    x0, y0, x1, y1 = box
    out = []
    for i, value in enumerate(points):
        out.append(x0 + value * (x1 - x0) if i % 2 == 0 else y0 + value * (y1 - y0))
    return out


def draw_part(draw: ImageDraw.ImageDraw, part: Part, box: Box, fill: int) -> None:
    """Draw one part, filled with ``fill``, on an ``L`` mask."""
    xy = _to_pixels(part.points, box)
    width = box[2] - box[0]
    if part.kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    elif part.kind == "rect":
        draw.rectangle(xy, fill=fill)
    elif part.kind == "poly":
        draw.polygon(list(zip(xy[0::2], xy[1::2], strict=True)), fill=fill)
    elif part.kind == "ring":
        draw.ellipse(xy, outline=fill, width=max(1, round(0.1 * width)))
    elif part.kind == "rounded":
        draw.rounded_rectangle(xy, radius=0.2 * width, fill=fill)
    else:
        raise ValueError(f"unknown part kind {part.kind!r}")


def _ball(draw: ImageDraw.ImageDraw, box: Box) -> None:
    draw.ellipse(box, fill=(245, 245, 245))
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0 + 0.42 * (y1 - y0), x1, y0 + 0.58 * (y1 - y0)), fill=(30, 30, 30))
    draw.ellipse(box, outline=(30, 30, 30), width=max(1, round(0.08 * (x1 - x0))))


def _flower(draw: ImageDraw.ImageDraw, box: Box) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle((x0 + 0.44 * w, y0 + 0.45 * h, x0 + 0.56 * w, y1), fill=(30, 120, 30))
    draw.ellipse((x0, y0, x1, y0 + 0.6 * h), fill=(250, 230, 40))
    draw.ellipse((x0 + 0.3 * w, y0 + 0.18 * h, x0 + 0.7 * w, y0 + 0.42 * h), fill=(120, 60, 20))


def _box(draw: ImageDraw.ImageDraw, box: Box) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    draw.rectangle(box, fill=(200, 160, 100))
    draw.rectangle((x0 + 0.42 * w, y0, x0 + 0.58 * w, y1), fill=(240, 230, 200))


SECOND_OBJECTS: dict[str, Callable[[ImageDraw.ImageDraw, Box], None]] = {
    "ball": _ball,
    "flower": _flower,
    "box": _box,
}
