"""Beam search equals HF's beams token for token, with hooks in every beam and ProjectAway edits as HF's.

A random tiny model rarely emits its end token, so each case also makes its second greedy token the end
token: hypotheses then finish at different steps, which exercises the finished set, the length penalty and
the stopping rules, not just the running beams.
"""

from __future__ import annotations

import pytest
import torch
from conformance.registry import NAMES, generation_inputs

from tl_vlm.analysis.editing import ProjectAway

SETTINGS = (
    {"num_beams": 3},
    {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.5},
    {"num_beams": 3, "early_stopping": True, "length_penalty": -1.0},
    {"num_beams": 2, "early_stopping": "never", "length_penalty": 2.0, "num_return_sequences": 2},
)
MAX_NEW = 6


def frequent_token(pair, inputs) -> int:
    """The second greedy token of the first row: an end token that some beams reach early."""
    greedy = pair.model.generate(inputs, max_new_tokens=2)
    return int(greedy[0, -1])


@pytest.mark.parametrize("name", NAMES)
def test_beams_equal_hf(loaded, name):
    pair = loaded(name)
    inputs = generation_inputs(pair.batch())
    for end in (None, frequent_token(pair, inputs)):
        for settings in SETTINGS:
            if end is not None:
                settings = {**settings, "eos_token_id": end}
            with torch.no_grad():
                expected = pair.hf.generate(**inputs.as_kwargs(), max_new_tokens=MAX_NEW, do_sample=False, **settings)
            assert torch.equal(pair.model.generate(inputs, max_new_tokens=MAX_NEW, **settings), expected), settings


def hf_image_token_id(hf) -> int:
    cfg = hf.config
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index


def hf_project_away_hook(directions, at_image, alpha):
    """The paper's edit as a forward hook on an HF decoder layer: on prompt passes, at image positions, each
    direction t in turn, h <- h - alpha * max(<h,t>/<t,t>, 0) * t (rows repeated per beam, as HF expands them)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] < at_image.shape[1]:
            return output
        where = at_image.repeat_interleave(hidden.shape[0] // at_image.shape[0], dim=0)
        h = hidden[where]
        for t in directions:
            h = h - alpha * (h @ t / (t @ t)).clamp(min=0)[:, None] * t
        hidden[where] = h
        return output

    return hook


@pytest.mark.parametrize("name", ["llava15", "blip2_opt", "qwen2_5_vl", "llava_onevision"])
def test_project_away_during_beam_search_equals_hf_with_the_same_hook(loaded, name):
    pair = loaded(name)
    model, hf = pair.model, pair.hf
    inputs = generation_inputs(pair.batch())
    objects, text_layer, image_layer, alpha = ["red", "square"], 1, 0, 40.0
    tok = model.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    lm = getattr(hf, "language_model", None) or hf.model.language_model
    with torch.no_grad():  # directions from HF's own hidden states, the paper's way
        directions = [lm(input_ids=torch.tensor([bos + tok(word, add_special_tokens=False).input_ids]),
                         output_hidden_states=True).hidden_states[text_layer][0, -1] for word in objects]
    at_image = inputs.input_ids == hf_image_token_id(hf)
    settings = {"max_new_tokens": MAX_NEW, "num_beams": 3, "num_return_sequences": 2}

    handle = pair.entry.hf_layers(hf)["language"][image_layer].register_forward_hook(
        hf_project_away_hook(directions, at_image, alpha))
    try:
        with torch.no_grad():
            expected = hf.generate(**inputs.as_kwargs(), do_sample=False, **settings)
    finally:
        handle.remove()
    edit = ProjectAway(model, objects, text_layer=text_layer, image_layer=image_layer, alpha=alpha)
    rows_seen = []
    with edit.applied(inputs), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: rows_seen.append(x.shape[0]))]):
        edited = model.generate(inputs, **settings)
    assert torch.equal(edited, expected)
    assert not torch.equal(edited, model.generate(inputs, **settings)), "the edit changes the beams"
    assert rows_seen == [2] + [2 * 3] * (len(rows_seen) - 1), "the prompt pass once per row, then every beam"


def test_beam_settings_that_are_refused(loaded):
    pair = loaded("llava15")
    inputs = generation_inputs(pair.batch())
    with pytest.raises(NotImplementedError, match="KV cache"):
        pair.model.generate(inputs, max_new_tokens=2, num_beams=2, use_past_kv_cache=False)
    with pytest.raises(NotImplementedError, match="beam sampling"):
        pair.model.generate(inputs, max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(NotImplementedError, match="without beams"):
        pair.model.generate(inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):  # HF's GenerationConfig refuses it
        pair.model.generate(inputs, max_new_tokens=2, num_beams=2, num_return_sequences=3)
