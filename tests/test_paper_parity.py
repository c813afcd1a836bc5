"""Jiang et al.'s definitions computed from HF's own hidden states, against tl_vlm's, at every layer.

The reference never calls tl_vlm's analysis code: it runs the HF model of the same fixture with
``output_hidden_states=True`` (n + 1 states; the last one after the final norm, as HF returns it), unembeds each
with HF's ``lm_head``, applies ``log_softmax``, keeps the top-k and renormalises (their LLaVA code, k=50; their
BLIP code keeps all), picks the image positions by the placeholder id of HF's config, and takes the max over
the word's sub-tokens (``confidence_map``) and over layers and positions (``internal_confidence``). Text
directions are HF's ``hidden_states[l]`` of the word run alone after BOS.
"""

from __future__ import annotations

import pytest
import torch
from conformance.registry import single_inputs

from tl_vlm.analysis.confidence import confidence_map, internal_confidence, object_token_ids
from tl_vlm.analysis.editing import ProjectAway, text_direction
from tl_vlm.analysis.logit_lens import image_positions, language_logit_lens, lens_hook_names

IMAGE_POSITION_FAMILIES = (
    "llava15", "llava_qwen2", "llava_interleave_siglip", "llava_next_mistral", "llava_onevision",
    "blip2_opt", "instructblip_vicuna", "qwen2_vl", "qwen2_5_vl",
)
WORDS = ["red", "square", "zebra"]  # one token, and several sub-tokens in the tiny vocabularies
PROB_ATOL = 1e-5
STATE_ATOL = 1e-4  # the conformance tolerance for hidden states


def hf_hidden_states(hf, inputs) -> tuple[torch.Tensor, ...]:
    """The language model's n + 1 hidden states of HF's forward pass (BLIP-2 reports them per sub-model)."""
    with torch.no_grad():
        out = hf(**inputs.as_kwargs(), output_hidden_states=True)
    return (getattr(out, "language_model_outputs", None) or out).hidden_states


def hf_image_token_id(hf) -> int:
    cfg = hf.config
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index


def reference_probs(hf, inputs, top_k) -> torch.Tensor:
    """[layer, image token, vocab]: softmax over the vocabulary of lm_head(hidden_states[l]) at the image
    positions of row 0, top-k renormalised."""
    at_image = inputs.input_ids[0] == hf_image_token_id(hf)
    per_layer = []
    for hidden in hf_hidden_states(hf, inputs):
        with torch.no_grad():
            scores = torch.log_softmax(hf.get_output_embeddings()(hidden[0, at_image]).float(), dim=-1)
        if top_k is not None:
            scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
        per_layer.append(scores.softmax(-1))
    return torch.stack(per_layer)


def reference_word_probs(probs, tokenizer, words) -> torch.Tensor:
    """[layer, image token, word]: max over each word's sub-tokens."""
    return torch.stack([probs[..., tokenizer(w, add_special_tokens=False).input_ids].amax(-1) for w in words], -1)


def layer_diffs(ours: torch.Tensor, reference: torch.Tensor) -> list[float]:
    return [(a - b).abs().max().item() for a, b in zip(ours, reference)]


@pytest.mark.parametrize("name", IMAGE_POSITION_FAMILIES)
@pytest.mark.parametrize("top_k", [50, None])
def test_confidence_equals_the_reference_at_every_layer(loaded, name, top_k):
    pair = loaded(name)
    model, hf = pair.model, pair.hf
    inputs = single_inputs(model, pair.entry, seed=4)
    full = reference_probs(hf, inputs, top_k)
    assert full.shape[0] == model.cfg.n_layers + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lens_hook_names(model))
        lens = language_logit_lens(model, cache, normed=False, top_k=top_k)[:, 0, image_positions(model, inputs.input_ids)[0]]
    diffs = layer_diffs(lens, full)
    assert max(diffs) <= PROB_ATOL, diffs

    reference = reference_word_probs(full, model.tokenizer, WORDS)
    heat = confidence_map(model, inputs, WORDS, top_k=top_k)[:, 0]
    assert heat.shape == reference.shape
    diffs = layer_diffs(heat, reference)
    assert max(diffs) <= PROB_ATOL, diffs
    confidence = internal_confidence(model, inputs, WORDS, top_k=top_k)
    assert (confidence[0] - reference.amax(dim=(0, 1))).abs().max() <= PROB_ATOL
    single = internal_confidence(model, inputs, "red", top_k=top_k)
    assert single.shape == (1,) and torch.equal(single, confidence[:, 0]), "a string is one word, not its characters"
    assert torch.equal(confidence_map(model, inputs, "red", top_k=top_k), heat[:, None, :, 0].expand(-1, 1, -1))


@pytest.mark.parametrize("name", IMAGE_POSITION_FAMILIES)
def test_text_direction_is_hf_hidden_states_at_every_layer(loaded, name):
    pair = loaded(name)
    model, hf = pair.model, pair.hf
    tok = model.tokenizer
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok("square", add_special_tokens=False).input_ids
    lm = getattr(hf, "language_model", None) or hf.model.language_model
    with torch.no_grad():
        states = lm(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = model.cfg.n_layers
    assert len(states) == n + 1
    for layer, state in enumerate(states):
        assert (text_direction(model, "square", layer) - state[0, -1]).abs().max() <= STATE_ATOL, layer
    assert torch.equal(text_direction(model, "square", -1), text_direction(model, "square", n))


def test_words_the_tokenizer_does_not_know_are_refused(loaded):
    model = loaded("llava15").model
    inputs = single_inputs(model, loaded("llava15").entry, seed=4)
    with pytest.raises(ValueError, match="'日本' is not in the vocabulary"):
        object_token_ids(model, "日本")
    with pytest.raises(ValueError, match="'日本'"):
        internal_confidence(model, inputs, ["red", "日本"])


def test_project_away_layer_numbering(loaded):
    model = loaded("llava15").model  # a 2-layer language model
    n = model.cfg.n_layers
    edit = ProjectAway(model, "square", text_layer=-1, image_layer=-n)
    assert edit.objects == ["square"] and edit.hook_name == "blocks.0.hook_resid_post"
    assert torch.equal(edit.directions[0], text_direction(model, "square", n))
    with pytest.raises(ValueError, match=f"text_layer {n + 1}: this model has {n + 1} HF hidden_states"):
        ProjectAway(model, "square", text_layer=n + 1, image_layer=0)
    with pytest.raises(ValueError, match=f"image_layer 2: this model has {n} decoder layers"):
        ProjectAway(model, "square", text_layer=1, image_layer=2)  # the paper's demo index, beyond this model
    with pytest.raises(ValueError, match="last decoder layer"):
        ProjectAway(model, "square", image_layer=-1)
    assert ProjectAway(model, "square", text_layer=0, image_layer="input").hook_name == "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="'inputs': pass a decoder layer index or 'input'"):
        ProjectAway(model, "square", image_layer="inputs")
