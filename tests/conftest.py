"""Tiny random-init LLaVA checkpoints, saved and loaded back through the real from_pretrained path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from tl_vlm import HookedVLM
from tl_vlm.zoo.tiny import VARIANTS, build_tiny_vlm
from tl_vlm.zoo.data import sample_images

# Tiny models gain nothing from threads, and under contention on 2 cores OpenMP's spin-waiting made a
# forward ~200x slower; one thread keeps the suite's time independent of what else the machine runs.
torch.set_num_threads(1)

PROMPTS = [
    "USER: <image>\nWhat is the colour? ASSISTANT:",
    "USER: <image>\nDescribe the shape in the image please. ASSISTANT:",
]
NON_SQUARE = [(60, 30), (30, 75)]  # (w, h): exercises anyres tiling, unpadding and image_newline


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {variant: build_tiny_vlm(root / variant, variant, seed=0) for variant in VARIANTS}


def hf_class(variant: str):
    return LlavaNextForConditionalGeneration if variant == "llava_next_mistral" else LlavaForConditionalGeneration


class Pair:
    """The HF reference and the HookedVLM loaded from the same saved checkpoint."""

    def __init__(self, variant: str, path):
        self.variant, self.path = variant, path
        self.hf = hf_class(variant).from_pretrained(path).eval()
        self.model = HookedVLM.from_pretrained(path)

    def images(self, n: int, seed: int = 1):
        sizes = NON_SQUARE[:n] if self.variant == "llava_next_mistral" else None
        return sample_images(n, seed=seed, sizes=sizes)

    def batch(self, padding_side: str = "left"):
        return self.model.prepare(images=self.images(2), text=PROMPTS, padding_side=padding_side)


@pytest.fixture(scope="session", params=VARIANTS)
def pair(request, checkpoints) -> Pair:
    torch.manual_seed(0)
    return Pair(request.param, checkpoints[request.param])


@pytest.fixture(scope="session")
def llava15(checkpoints) -> Pair:
    return Pair("llava15", checkpoints["llava15"])
