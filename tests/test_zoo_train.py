"""The toy-model training runs offline for every family, learns, and its checkpoint loads through HookedVLM."""

from __future__ import annotations

import json

import pytest
import torch

from tl_vlm import HookedVLM
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data
from tl_vlm.zoo.train import FAMILIES, train_toy


@pytest.mark.parametrize("family", FAMILIES)
def test_short_training_run_saves_a_loadable_learning_model(family, tmp_path, capsys):
    scores = train_toy(family, tmp_path, steps=30, batch_size=16, vision_steps=10, n_held_out=12)
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[3]) for line in lines if line.startswith("step")]
    assert losses[0] > 2 * losses[-1], losses
    metrics = json.loads((tmp_path / "toy_metrics.json").read_text())
    assert metrics["held_out_accuracy"] == scores and set(scores) == set(data.QUESTION_TYPES)
    assert set(metrics["vision_pretraining_accuracy"]) == {"shape", "colour", "position", "count", "bar_value", "highest_bar"}
    model = HookedVLM.from_pretrained(tmp_path)
    example = data.make_examples(1, seed=9)[0]
    logits = model(model.prepare(images=example.image, text=format_prompt(model.processor, example.question)))
    assert logits.shape[-1] == model.cfg.d_vocab and not torch.isnan(logits).any()


def test_examples_are_deterministic_and_answer_what_is_drawn():
    first, again = data.make_examples(12, seed=3), data.make_examples(12, seed=3)
    assert [(e.question, e.answer, e.image.tobytes()) for e in first] == [(e.question, e.answer, e.image.tobytes()) for e in again]
    assert [e.kind for e in first[:6]] == list(data.QUESTION_TYPES)
    for ex in first:
        if ex.kind in ("colour", "shape", "position"):
            assert len(ex.objects) == 1 and ex.answer == ex.objects[0][ex.kind]
            x0, y0, x1, y1 = ex.objects[0]["box"]
            centre = ex.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2))
            assert centre == data.COLOURS[ex.objects[0]["colour"]]
        elif ex.kind == "count":
            assert ex.answer == data.COUNT_WORDS[len(ex.objects) - 1]
        elif ex.kind == "highest_bar":
            assert ex.answer == max(ex.objects, key=lambda b: b["value"])["colour"]
        else:
            bar = next(b for b in ex.objects if b["colour"] in ex.question)
            assert ex.answer == str(bar["value"])
    twin = data.recolour(first[0], "red" if first[0].answer != "red" else "blue")
    changed = [a != b for a, b in zip(first[0].image.getdata(), twin.image.getdata())]
    assert twin.answer != first[0].answer and twin.question == first[0].question
    assert any(changed) and all(first[0].image.getdata()[i] == data.COLOURS[first[0].answer] for i, c in enumerate(changed) if c)
    with pytest.raises(ValueError, match="single-shape"):
        data.recolour(first[3], "red")
    with pytest.raises(ValueError, match="unknown question types"):
        data.make_examples(2, seed=0, kinds=("size",))
