"""The shipped toy models load by name, offline, and answer held-out questions at their reported accuracy."""

from __future__ import annotations

import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data
from tl_vlm.zoo.toys import TOYS, toy_checkpoint, toy_metrics
from tl_vlm.zoo.train import FAMILIES

# The toys trained on the question-answering task (the biased-world toy is tested in test_toy_world.py).
QA_TOYS = sorted(name for name, family in TOYS.items() if family in FAMILIES)


def _answers(model: HookedVLM, examples: list[data.Example], batch_size: int = 50) -> list[str]:
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = model.prepare(images=[ex.image for ex in chunk], text=[format_prompt(model.processor, ex.question) for ex in chunk],
                               padding_side="left")
        tokens = model.generate(inputs, max_new_tokens=4)
        out += model.tokenizer.batch_decode(tokens[:, inputs.shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in out]


@pytest.mark.parametrize("name", QA_TOYS)
def test_toy_answers_held_out_questions_at_its_reported_accuracy(name):
    metrics = toy_metrics(name)
    model = HookedVLM.from_pretrained(name)
    held_out = data.make_examples(metrics["held_out_examples"], seed=metrics["held_out_seed"])
    answers = _answers(model, held_out)
    for kind, reported in metrics["held_out_accuracy"].items():
        hits = [a == ex.answer for a, ex in zip(answers, held_out) if ex.kind == kind]
        # HookedVLM's greedy answers are HF's; allow one near-tie flip per question type.
        assert abs(sum(hits) / len(hits) - reported) <= 1 / len(hits) + 1e-9, (kind, sum(hits) / len(hits), reported)


@pytest.mark.parametrize("name", QA_TOYS)
def test_toy_meets_the_colour_and_shape_target(name):
    scores = toy_metrics(name)["held_out_accuracy"]
    assert scores["colour"] >= 0.95 and scores["shape"] >= 0.95, scores


def test_toy_names_resolve_without_a_hub():
    assert toy_checkpoint("tl-vlm/toy-llava").is_dir()
    assert toy_checkpoint("llava-hf/llava-1.5-7b-hf") is None
    with pytest.raises(ValueError, match="not a toy"):
        toy_metrics("tl-vlm/toy-gpt")
    assert torch.is_tensor(HookedVLM.from_pretrained("tl-vlm/toy-llava").W_U)
