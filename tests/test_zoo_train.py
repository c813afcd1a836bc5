"""The toy-model training loop runs offline, learns, and its checkpoint loads through HookedVLM."""

from __future__ import annotations

import json

import torch

from tl_vlm import HookedVLM
from tl_vlm.zoo.train import examples, train_toy_llava


def test_short_training_run_saves_a_loadable_learning_model(tmp_path, capsys):
    scores = train_toy_llava(tmp_path, steps=60, batch_size=16)
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert losses[0] > 2 * losses[-1], losses
    assert json.loads((tmp_path / "toy_metrics.json").read_text())["held_out_accuracy"] == scores
    model = HookedVLM.from_pretrained(tmp_path)
    image, _, prompt, answer = examples(1, seed=9)[0]
    inputs = model.prepare(images=image, text=prompt)
    assert inputs.pixel_values.shape[-1] == 48
    assert model(inputs).shape[-1] == model.cfg.d_vocab and not torch.isnan(model(inputs)).any()
