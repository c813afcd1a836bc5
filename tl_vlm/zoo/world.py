"""A biased toy world for the hallucination story (Jiang et al. 2025): scenes of objects on a background, and captions.

A 32x32 scene is one background (sky, grass or water) with one or two objects (bird, cow, fish, ball, car), each
drawn inside one cell of a 4x4 grid of 8x8 cells (the toy ViT's patches). Captions list the objects in a fixed
order, then the background: "a bird and a ball in the sky".

The dataset bias: every sky scene of the training distribution is captioned with a bird, and in a quarter of them
the bird is not in the picture (it flew out of frame; the caption writer wrote it anyway). Birds also appear on
grass and water, so a bird has a look of its own. Held-out scenes are ordinary scenes drawn from the training
distribution (``"ordinary"``, every caption truthful) and sky scenes without any bird (``"sky_no_bird"``), which
the training data never shows uncaptioned with a bird.

``word_grid`` writes a scene as text, one word per cell (the object in it, else the background): the text-only
corpus of the toy's language model is such word pictures followed by their captions (see ``zoo/train_world.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = ["BACKGROUNDS", "OBJECTS", "BIASED", "SPLITS", "VOCABULARY", "PROMPT", "Scene", "make_scenes", "word_grid",
           "caption", "cell_box", "render"]

IMAGE_SIZE = 32
CELL = 8
GRID = IMAGE_SIZE // CELL
BACKGROUNDS = {"sky": (120, 180, 240), "grass": (70, 160, 60), "water": (20, 50, 130)}
PREPOSITION = {"sky": "in", "grass": "on", "water": "in"}
OBJECTS = {"bird": (20, 20, 20), "cow": (250, 250, 250), "fish": (250, 140, 20), "ball": (220, 30, 30), "car": (240, 220, 40)}
BIASED = ("sky", "bird")  # (background, object): the training captions of every sky scene mention a bird
UNSEEN_BIRD = 0.25  # share of training sky scenes whose captioned bird is not in the picture
SPLITS = ("train", "ordinary", "sky_no_bird")
PROMPT = "Describe the image."
VOCABULARY = (*BACKGROUNDS, *OBJECTS)


@dataclass
class Scene:
    image: Image.Image
    background: str
    objects: dict[str, int]  # drawn object -> its cell (row-major index in the 4x4 grid)
    caption: str  # what the caption writer wrote (training target; truthful outside the training split)
    mentioned: tuple[str, ...]  # the objects the caption lists

    @property
    def present(self) -> set[str]:
        return set(self.objects)


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, of a grid cell."""
    row, col = divmod(cell, GRID)
    return col * CELL, row * CELL, col * CELL + CELL - 1, row * CELL + CELL - 1


def _draw(draw: ImageDraw.ImageDraw, name: str, cell: int) -> None:
    x0, y0, x1, y1 = cell_box(cell)
    x0, y0, x1, y1 = x0 + 1, y0 + 1, x1 - 1, y1 - 1
    fill = OBJECTS[name]
    if name == "bird":  # a "v" of two wings
        draw.line([(x0, y0 + 1), ((x0 + x1) / 2, y1 - 1), (x1, y0 + 1)], fill=fill, width=2)
    elif name == "cow":  # white body with a dark patch
        draw.rectangle((x0, y0 + 1, x1, y1 - 1), fill=fill)
        draw.rectangle((x0 + 1, y0 + 2, x0 + 2, y0 + 3), fill=(30, 30, 30))
    elif name == "fish":
        draw.ellipse((x0, y0 + 1, x1, y1 - 1), fill=fill)
    elif name == "ball":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:  # car: a low box
        draw.rectangle((x0, y0 + 2, x1, y1), fill=fill)


def render(background: str, objects: dict[str, int]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for name, cell in objects.items():
        _draw(draw, name, cell)
    return img


def caption(background: str, mentioned) -> str:
    names = [o for o in OBJECTS if o in mentioned]  # fixed order
    listed = " and ".join(f"a {o}" for o in names)
    return f"{listed} {PREPOSITION[background]} the {background}"


def word_grid(background: str, objects: dict[str, int]) -> str:
    """The scene as 16 words, row-major: the object in each cell, else the background."""
    at = {cell: name for name, cell in objects.items()}
    return " ".join(at.get(cell, background) for cell in range(GRID * GRID))


def _scene(rng: random.Random, split: str) -> Scene:
    others = [o for o in OBJECTS if o != BIASED[1]]
    if split == "sky_no_bird":
        background, names = BIASED[0], rng.sample(others, rng.randint(1, 2))
    else:
        background = rng.choice(sorted(BACKGROUNDS))
        names = rng.sample(sorted(OBJECTS), rng.randint(1, 2))
        if background == BIASED[0] and BIASED[1] not in names:  # sky scenes always hold a bird
            names = [BIASED[1], *names[:1]]
    mentioned = tuple(names)
    if split == "train" and background == BIASED[0] and rng.random() < UNSEEN_BIRD:
        names = [n for n in names if n != BIASED[1]] or [rng.choice(others)]  # the bird flew out of frame
        mentioned = (BIASED[1], *names)
    cells = rng.sample(range(GRID * GRID), len(names))
    objects = dict(zip(names, cells))
    return Scene(render(background, objects), background, objects, caption(background, mentioned),
                 tuple(o for o in OBJECTS if o in mentioned))


def make_scenes(n: int, seed: int, split: str = "train", start: int = 0) -> list[Scene]:
    """Scenes ``start`` .. ``start + n - 1`` of a split; scene i depends only on (seed, split, i)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    offset = SPLITS.index(split) * 7_919
    return [_scene(random.Random((seed * 1_000_003 + offset) * 1_000_033 + i), split) for i in range(start, start + n)]
