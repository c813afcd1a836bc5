"""Synthetic visual question answering, deterministic from a seed: shapes on a grid and bar charts.

Scenes put coloured squares, circles and triangles in the cells of a 3x3 grid on a grey background;
questions ask for the colour, shape or position of a lone shape, or how many shapes there are. Charts
draw three to four coloured bars with integer values 1-5 on a white background, with a tick on the
axis at each value; questions ask for one bar's value or which bar is highest (a small echo of the
chart-understanding study). Every example records what was drawn, so analyses can use ground truth
(``Example.objects``: one dict per shape or bar with its pixel box).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "POSITIONS", "QUESTION_TYPES", "VOCABULARY", "Example",
    "scene", "chart", "render", "recolour", "make_examples",
]

IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (128, 128, 128)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SHAPES = ("square", "circle", "triangle")
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "center", "right")
# One phrase per grid cell: "top left", "top", ..., "center", ..., "bottom right".
POSITIONS = tuple(
    " ".join(w for w in (r if r != "middle" else "", c if c != "center" else "") if w) or "center"
    for r in _ROWS for c in _COLS
)
COUNT_WORDS = ("one", "two", "three", "four")
MAX_VALUE = 5
QUESTIONS = {
    "colour": "What is the colour of the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "count": "How many shapes are there?",
    "bar_value": "What is the value of the {colour} bar?",
    "highest_bar": "Which bar is highest?",
}
QUESTION_TYPES = tuple(QUESTIONS)
# Words the toy tokenizers keep whole (the rest of the prompt vocabulary is in zoo/tiny.py).
VOCABULARY = ("shapes", "there", "value", "bar", "highest", "chart", *COLOURS, *SHAPES, *_ROWS, *_COLS, *COUNT_WORDS)


@dataclass
class Example:
    image: Image.Image
    kind: str
    question: str
    answer: str
    objects: list[dict] = field(default_factory=list)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(objects: list[dict]) -> Image.Image:
    """Draw shapes (dicts with shape, colour, box) on the grey background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_shape(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
    return img


def recolour(example: Example, colour: str) -> Example:
    """The same single-shape scene and question with the shape in `colour`: a minimal pair for patching."""
    if len(example.objects) != 1 or example.kind not in ("colour", "shape", "position"):
        raise ValueError("recolour takes a single-shape scene (colour, shape or position question)")
    objects = [{**example.objects[0], "colour": colour}]
    answer = colour if example.kind == "colour" else example.answer
    return Example(render(objects), example.kind, example.question, answer, objects)


def scene(rng: random.Random, n_objects: int) -> tuple[Image.Image, list[dict]]:
    """`n_objects` shapes of distinct colours in distinct grid cells."""
    cell = IMAGE_SIZE // GRID
    objects = []
    for index, colour in zip(rng.sample(range(GRID * GRID), n_objects), rng.sample(sorted(COLOURS), n_objects)):
        row, col = divmod(index, GRID)
        side = rng.randint(cell * 2 // 3, cell - 2)
        x0 = col * cell + rng.randint(1, cell - side - 1)
        y0 = row * cell + rng.randint(1, cell - side - 1)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        objects.append({"shape": rng.choice(SHAPES), "colour": colour, "position": POSITIONS[index], "box": box})
    return render(objects), objects


def chart(rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """Three or four bars of distinct colours and values 1-5, ticks on the y axis at every value."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, bottom, top = 8, IMAGE_SIZE - 4, 6
    unit = (bottom - top) / MAX_VALUE
    draw.line([(left, top), (left, bottom), (IMAGE_SIZE - 2, bottom)], fill=(0, 0, 0))
    for v in range(1, MAX_VALUE + 1):
        y = round(bottom - v * unit)
        draw.line([(left - 3, y), (left, y)], fill=(0, 0, 0))
    n_bars = rng.randint(3, 4)
    colours = rng.sample(sorted(c for c in COLOURS if c != "white"), n_bars)
    values = rng.sample(range(1, MAX_VALUE + 1), n_bars)  # distinct, so "highest" has one answer
    width = (IMAGE_SIZE - left - 4) // n_bars
    bars = []
    for i, (colour, value) in enumerate(zip(colours, values)):
        x0 = left + 2 + i * width
        box = (x0, round(bottom - value * unit), x0 + width - 3, bottom - 1)
        draw.rectangle(box, fill=COLOURS[colour])
        bars.append({"colour": colour, "value": value, "box": box})
    return img, bars


def _example(rng: random.Random, kind: str) -> Example:
    if kind in ("bar_value", "highest_bar"):
        img, bars = chart(rng)
        if kind == "highest_bar":
            return Example(img, kind, QUESTIONS[kind], max(bars, key=lambda b: b["value"])["colour"], bars)
        bar = rng.choice(bars)
        return Example(img, kind, QUESTIONS[kind].format(colour=bar["colour"]), str(bar["value"]), bars)
    n_objects = rng.randint(1, len(COUNT_WORDS)) if kind == "count" else 1
    img, objects = scene(rng, n_objects)
    answer = COUNT_WORDS[n_objects - 1] if kind == "count" else objects[0][kind]
    return Example(img, kind, QUESTIONS[kind], answer, objects)


def make_examples(n: int, seed: int, kinds: tuple[str, ...] = QUESTION_TYPES, start: int = 0) -> list[Example]:
    """Examples `start` .. `start + n - 1` cycling through `kinds`; example i depends only on (seed, i)."""
    unknown = set(kinds) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; choose from {QUESTION_TYPES}")
    return [_example(random.Random(seed * 1_000_003 + i), kinds[i % len(kinds)]) for i in range(start, start + n)]


def sample_images(
    n: int, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None
) -> list[Image.Image]:
    """Deterministic small RGB images, each one coloured square/circle/triangle on a plain background.

    `sizes` optionally gives (width, height) per image (default 40x40), e.g. non-square sizes to exercise
    anyres tiling. The drawn content is recorded in ``img.info["colour"]``, ``["shape"]``, ``["background"]``.
    """
    if sizes is None:
        sizes = [(40, 40)] * n
    if len(sizes) != n:
        raise ValueError(f"got {len(sizes)} sizes for {n} images")

    images = []
    for i, (w, h) in enumerate(sizes):
        rng = random.Random(seed * 100_003 + i)
        background, colour = rng.sample(sorted(COLOURS), 2)
        shape = rng.choice(SHAPES)
        side = max(2, int(min(w, h) * rng.uniform(0.35, 0.6)))
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)

        img = Image.new("RGB", (w, h), COLOURS[background])
        draw = ImageDraw.Draw(img)
        if shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x0 + side / 2, y0), (box[2], box[3]), (x0, box[3])], fill=COLOURS[colour])
        img.info.update(colour=colour, shape=shape, background=background)
        images.append(img)
    return images
