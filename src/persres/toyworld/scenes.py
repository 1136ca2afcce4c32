"""Procedural toy scenes with captions and ground truth.

A scene is one object of a class (8 silhouette families) with an instance appearance (one of 8
colours x 4 patterns, a size and a position), on one of 6 backgrounds, in one of 3 styles, with an
optional second object beside it. Rendering is deterministic: drawn at 4x with PIL and box-filtered
down to 32x32 RGB, so edges are anti-aliased like a photo's. ``render`` returns the image and the
object's mask; the Scene itself is the rest of the truth.

Held-out instances (a class with one colour and pattern) never appear in training scenes; they are
the concepts the demo and the quality benchmark personalize.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from persres.toyworld.backgrounds import BACKGROUNDS, draw_background
from persres.toyworld.shapes import CLASS_ASPECT, CLASS_PARTS, SECOND_OBJECTS, draw_part

SIZE = 32
SCALE = 4  # drawn at SIZE * SCALE, then box-filtered down
CLASSES = tuple(CLASS_PARTS)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "brown": (130, 80, 40),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
STYLES = ("photo", "painting", "sketch")
SECONDS = (None, *SECOND_OBJECTS)
PLACES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "forest": "in the forest",
    "city": "in the city",
    "grass": "on the grass",
    "studio": "in the studio",
}
assert tuple(PLACES) == BACKGROUNDS

HELD_OUT: tuple[tuple[str, str, str], ...] = (  # (class, colour, pattern) never in training scenes
    ("dog", "red", "striped"),
    ("cat", "blue", "dotted"),
    ("cup", "yellow", "checkered"),
    ("car", "green", "striped"),
    ("chair", "purple", "dotted"),
    ("teddybear", "orange", "checkered"),
    ("vase", "pink", "striped"),
    ("backpack", "brown", "dotted"),
)


@dataclass(frozen=True)
class Scene:
    cls: str
    colour: str
    pattern: str
    background: str
    style: str = "photo"
    second: str | None = None
    size: float = 0.8  # longer side of the object's box, as a fraction of the image
    x: float = 0.5  # centre of the object's box, fractions of the image
    y: float = 0.55
    seed: int = 0  # background layout and colour jitter

    @property
    def instance(self) -> tuple[str, str, str]:
        return (self.cls, self.colour, self.pattern)

    def truth(self) -> dict[str, object]:
        return asdict(self)


def random_scene(
    rng: np.random.Generator,
    instance: tuple[str, str, str] | None = None,
    exclude: tuple[tuple[str, str, str], ...] = HELD_OUT,
    style: str | None = None,
    background: str | None = None,
    second: str | None | Literal[False] = False,
) -> Scene:
    """A random scene; ``instance`` fixes class, colour and pattern; ``second=False`` draws it at random."""
    while True:
        cls, colour, pattern = instance or (
            str(rng.choice(CLASSES)),
            str(rng.choice(list(COLOURS))),
            str(rng.choice(PATTERNS)),
        )
        if instance or (cls, colour, pattern) not in exclude:
            break
    if second is False:
        second = None if rng.random() < 0.75 else str(rng.choice(list(SECOND_OBJECTS)))
    size = rng.uniform(0.5, 0.65) if second else rng.uniform(0.62, 0.9)
    if second:
        x = rng.choice([0.36, 0.64]) + rng.uniform(-0.04, 0.04)
    else:
        x = 0.5 + rng.uniform(-0.5, 0.5) * (1 - size)
    y = 0.5 + rng.uniform(-0.5, 0.5) * (1 - size)
    style = style or str(rng.choice(STYLES, p=[0.6, 0.2, 0.2]))
    return Scene(
        cls,
        colour,
        pattern,
        background or str(rng.choice(BACKGROUNDS)),
        style,
        second or None,
        float(size),
        float(x),
        float(y),
        int(rng.integers(2**31)),
    )


def object_box(scene: Scene, scale: int = SCALE) -> tuple[float, float, float, float]:
    ax, ay = CLASS_ASPECT[scene.cls]
    side = scene.size * SIZE * scale
    w, h = side * ax, side * ay
    cx, cy = scene.x * SIZE * scale, scene.y * SIZE * scale
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _second_box(scene: Scene, scale: int) -> tuple[float, float, float, float]:
    side = 0.3 * SIZE * scale
    left = scene.x < 0.5
    x0 = (SIZE * scale - side - 0.06 * SIZE * scale) if left else 0.06 * SIZE * scale
    y1 = 0.96 * SIZE * scale
    return (x0, y1 - side, x0 + side, y1)


def pattern_mask(pattern: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Where the pattern's ink goes, anchored at the object's box so an instance looks the same anywhere."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = xx - box[0], yy - box[1]
    period = 8 * SCALE  # 8 output pixels
    if pattern == "solid":
        return np.zeros((size, size), bool)
    if pattern == "striped":
        return ((u + v) % period) < period / 2
    if pattern == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return du * du + dv * dv < (0.27 * period) ** 2
    if pattern == "checkered":
        half = period / 2
        return ((u // half + v // half) % 2) == 0
    raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")


def ink(colour: str) -> tuple[int, int, int]:
    """Pattern ink: white on dark colours, near-black on light ones."""
    r, g, b = COLOURS[colour]
    return (250, 250, 250) if 0.3 * r + 0.59 * g + 0.11 * b < 150 else (25, 25, 25)


def _object_layers(scene: Scene, size: int) -> dict[str, np.ndarray]:
    box = object_box(scene)
    layers = {}
    for layer in ("body", "shade", "black"):
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for part in CLASS_PARTS[scene.cls]:
            if part.layer == layer:
                draw_part(draw, part, box, 255)
        layers[layer] = np.asarray(canvas) > 127
    return layers


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (32, 32, 3), object mask float32 (32, 32) in [0, 1])."""
    big = SIZE * SCALE
    rng = np.random.default_rng(scene.seed)
    canvas = draw_background(scene.background, big, rng)
    if scene.second:
        SECOND_OBJECTS[scene.second](ImageDraw.Draw(canvas), _second_box(scene, SCALE))
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    layers = _object_layers(scene, big)
    colour = np.array(COLOURS[scene.colour], np.float32)
    body = np.where(pattern_mask(scene.pattern, object_box(scene), big)[..., None], ink(scene.colour), colour)
    pixels[layers["body"]] = body[layers["body"]]
    pixels[layers["shade"]] = 0.6 * colour
    pixels[layers["black"]] = 20.0
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    image = stylize(image, scene.style, rng)
    small = image.reduce(SCALE)
    mask = Image.fromarray(((layers["body"] | layers["shade"] | layers["black"]) * 255).astype(np.uint8))
    return np.asarray(small), np.asarray(mask.reduce(SCALE), dtype=np.float32) / 255.0


def stylize(image: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    """photo: as drawn plus sensor noise; painting: posterized with brush strokes; sketch: pencil lines."""
    if style == "photo":
        noise = rng.normal(0, 4, (*image.size[::-1], 3))
        return Image.fromarray((np.asarray(image, np.float32) + noise).clip(0, 255).astype(np.uint8))
    if style == "painting":
        levels = np.round(np.asarray(image, np.float32) / 64) * 64
        blotches = Image.fromarray((rng.uniform(0.75, 1.2, (4, 4)) * 100).astype(np.uint8))
        light = np.asarray(blotches.resize(image.size, Image.Resampling.BICUBIC), np.float32) / 100
        warm = levels * light[..., None] * np.array([1.1, 0.98, 0.8])
        return Image.fromarray(warm.clip(0, 255).astype(np.uint8))
    if style == "sketch":
        grey = image.convert("L").filter(ImageFilter.GaussianBlur(2))
        edges = np.asarray(grey.filter(ImageFilter.FIND_EDGES), np.float32)
        lines = 245 - np.clip(edges * 6, 0, 200)
        return Image.fromarray(np.repeat(lines[..., None], 3, axis=2).astype(np.uint8))
    raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene in words; with ``rng``, words are dropped at random (colour, pattern, place, prefix).

    Dropping teaches the model short prompts too ("a photo of a dog"), the form personalization
    prompts take; every kept word stays true of the image.
    """
    keep = (lambda p: rng.random() >= p) if rng is not None else (lambda p: True)
    words = []
    if keep(0.3):
        words.append(scene.colour)
    if scene.pattern != "solid" and keep(0.3):
        words.append(scene.pattern)
    noun = " ".join([*words, scene.cls])
    prefix = {"photo": "a photo of", "painting": "a painting of", "sketch": "a sketch of"}[scene.style]
    if scene.style == "photo" and not keep(0.3):
        text = f"a {noun}"
    else:
        text = f"{prefix} a {noun}"
    if keep(0.2):
        text += f" {PLACES[scene.background]}"
    if scene.second and keep(0.1):
        text += f" with a {scene.second}"
    return text


def with_instance(scene: Scene, instance: tuple[str, str, str]) -> Scene:
    cls, colour, pattern = instance
    return replace(scene, cls=cls, colour=colour, pattern=pattern)


def vocabulary() -> list[str]:
    """Every word a toy caption or prompt uses, plus identifier tokens."""
    words = {"a", "photo", "painting", "sketch", "of", "with", "the", "on", "in", "style"}
    words |= set(CLASSES) | set(COLOURS) | set(PATTERNS) | set(SECOND_OBJECTS)
    words |= {w for phrase in PLACES.values() for w in phrase.split()}
    return sorted(words | {"sks", "zwx", "vkz", "qpl"})
