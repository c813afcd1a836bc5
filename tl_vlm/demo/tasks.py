"""What the demo asks a model: the colour of a shape (``zoo.data``, any model), or, for the biased-world toy
(``zoo.world``, the one the toy's training record names), the first object of a caption.

A task gives the demo's scene, its minimal-pair twin (same prompt and geometry, another answer) and the scenes of the
pointing game, as ``zoo.data.Example`` rows (``objects[0]``: the answered object's pixel box and what it is); the
prompt is the question through the model's template followed by ``answer_prefix``, so that the next token is the
answer word (a caption starts "a ...": the prefix is " a").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from tl_vlm.zoo import data, world
from tl_vlm.zoo.data import Example


@dataclass(frozen=True)
class Task:
    name: str
    scenes: Callable[[int], tuple[Example, Example, list[Example]]]  # seed -> clean, corrupted twin, more scenes
    answer_prefix: str
    words: tuple[str, ...]  # possible answers; the first of them in a generated answer is the model's answer
    background: Callable[[Example], tuple[int, int, int]]  # the scene's background colour (the rest is the object)
    describe: Callable[[dict], str]  # objects[0] -> "a red square at top left"

    def first_word(self, answer: str) -> str | None:
        """The first answer word of a generated answer ("The shape is white." -> "white")."""
        return next((w for w in re.findall(r"[a-z]+", answer.lower()) if w in self.words), None)


def _colour_scenes(seed: int) -> tuple[Example, Example, list[Example]]:
    """A colour question about a generated scene, and its twin: the shape in the colour another scene asks for."""
    examples = data.make_examples(16, seed, kinds=("colour",))
    clean = examples[0]
    colour = next(e.answer for e in examples[1:] if e.answer != clean.answer)
    return clean, data.recolour(clean, colour), examples[1:]


def _world_example(background: str, obj: str, cell: int) -> Example:
    image = world.render(background, {obj: cell})
    return Example(image, "caption", world.PROMPT, obj,
                   [{"object": obj, "background": background, "cell": cell, "box": world.cell_box(cell)}])


def _world_scenes(seed: int) -> tuple[Example, Example, list[Example]]:
    """Held-out one-object scenes away from the biased background; the twin draws another object in the same cell."""
    scenes = [s for s in world.make_scenes(96, seed, "ordinary") if len(s.objects) == 1 and s.background != world.BIASED[0]]
    examples = [_world_example(s.background, *next(iter(s.objects.items()))) for s in scenes[:16]]
    clean = examples[0]
    other = next(o for o in world.OBJECTS if o not in (clean.answer, world.BIASED[1]))
    return clean, _world_example(clean.objects[0]["background"], other, clean.objects[0]["cell"]), examples[1:]


COLOUR = Task("colour", _colour_scenes, "", tuple(data.COLOURS), lambda ex: data.BACKGROUND,
              lambda o: f"a {o['colour']} {o['shape']} at {o['position']}")
WORLD = Task("world", _world_scenes, " a", tuple(world.OBJECTS), lambda ex: world.BACKGROUNDS[ex.objects[0]["background"]],
             lambda o: f"a {o['object']} {world.PREPOSITION[o['background']]} the {o['background']}, cell {o['cell']}")


def task_for(model_name: str) -> Task:
    """The biased-world task for the toy trained on it (``zoo.toys.TOYS`` names its training), else the colour question."""
    from tl_vlm.zoo.toys import TOYS

    return WORLD if TOYS.get(model_name) == "llava_bias" else COLOUR
