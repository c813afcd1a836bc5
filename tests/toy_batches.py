"""The bundled toys with a small batch of image prompts, loaded once per test session."""

from __future__ import annotations

from functools import cache

import torch

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data

QUESTIONS = ["What colour is the shape?", "What shape is in the image?"]


@cache
def toy(name: str = "tl-vlm/toy-llava") -> HookedVLM:
    torch.manual_seed(0)
    return HookedVLM.from_pretrained(name)


def toy_batch(model: HookedVLM, n: int = 2, seed: int = 0) -> VLMInputs:
    """``n`` scene images with alternating questions, padded on the left (as for generation)."""
    examples = data.make_examples(n, seed=seed, kinds=("colour", "shape"))
    text = [format_prompt(model.processor, QUESTIONS[i % 2]) for i in range(n)]
    return model.prepare(images=[ex.image for ex in examples], text=text, padding_side="left")
