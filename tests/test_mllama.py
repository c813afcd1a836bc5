"""Llama 3.2 Vision specifics beyond the conformance contract: text-only prompts (HF skips the cross-attention
layers), the image keys computed once in generation, the gates, HF's full-text-row masking, decompositions with
gated and cross-attention blocks, cross-attention heads against HF surgery at every cross layer, attribution
through the cross-attention, and the vision towers' tile / patch index."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from conformance.registry import ATOL, MLLAMA_PROMPTS, MLLAMA_SIZES, max_diff, quiet, single_inputs
from tl_vlm.analysis.attribution import attribution_patch
from tl_vlm.analysis.knockout import knockout_text_to_image
from tl_vlm.analysis.logit_lens import image_positions
from tl_vlm.zoo.data import sample_images


@pytest.fixture(scope="module")
def pair(loaded):
    return loaded("mllama")


def test_capabilities_say_images_enter_by_cross_attention(pair):
    caps = pair.model.capabilities
    assert caps.cross_attention and caps.tiles and not caps.image_positions and not caps.spatial_cells
    with pytest.raises(NotImplementedError, match="cross-attention"):
        image_positions(pair.model, pair.batch().input_ids)
    with pytest.raises(NotImplementedError, match="vision_cells"):
        pair.model.image_token_cells(pair.batch(), None)


def test_text_only_prompt_skips_the_cross_layers_as_hf(pair):
    model, hf = pair.model, pair.hf
    text = model.tokenizer(["What is the colour of a red square?"], return_tensors="pt")
    outputs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in hf.model.language_model.layers]
    try:
        with torch.no_grad():
            expected = hf(**text).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        logits, cache = model.run_with_cache(dict(text))
    assert max_diff(logits, expected) <= ATOL
    self_layers = [i for i in range(model.cfg.n_layers) if i not in model.vlm_cfg.cross_attention_layers]
    assert len(outputs) == len(self_layers), "HF skips the cross-attention layers without an image"
    for i, hidden in zip(self_layers, outputs):
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], hidden) <= ATOL
    for i in model.vlm_cfg.cross_attention_layers:  # passed through: only the residual hooks fire
        assert torch.equal(cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_resid_post"])
        assert f"blocks.{i}.cross_attn.hook_q" not in cache and f"blocks.{i}.hook_mlp_out" not in cache
    assert not any(name.startswith(("vision", "projector")) for name in cache.keys())
    with torch.no_grad():
        generated = hf.generate(**text, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(dict(text), max_new_tokens=6), generated)


def test_image_keys_are_computed_once_in_generation(pair):
    model, batch = pair.model, pair.batch()
    calls = {"k": 0, "q": 0}

    def count(kind):
        def hook(x, hook):
            calls[kind] += 1

        return hook

    fwd = [("blocks.2.cross_attn.hook_k", count("k")), ("blocks.2.cross_attn.hook_q", count("q")),
           ("vision.hook_embed", count("k"))]
    with model.hooks(fwd_hooks=fwd):
        cached = model.generate(batch, max_new_tokens=4)
    assert calls == {"k": 2, "q": 4}, "keys and the vision tower once (the prompt pass), queries at every step"
    calls.update(k=0, q=0)
    with model.hooks(fwd_hooks=fwd):
        uncached = model.generate(batch, max_new_tokens=4, use_past_kv_cache=False)
    assert calls == {"k": 8, "q": 4} and torch.equal(cached, uncached)


def test_beam_search_carries_the_image_keys_with_the_beams(pair):
    batch = pair.batch()
    with torch.no_grad():
        expected = pair.hf.generate(**batch.as_kwargs(), max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(pair.model.generate(batch, max_new_tokens=5, num_beams=3), expected)


def test_gates_are_parameters_and_zero_gates_equal_hf_surgery(pair):
    model, hf, batch = pair.model, pair.hf, pair.batch()
    layer = hf.model.language_model.layers[2]
    assert torch.equal(model.blocks[2].gate_attn, layer.cross_attn_attn_gate)
    assert torch.equal(model.vision_global.blocks[1].gate_ffn, hf.model.vision_model.global_transformer.layers[1].gate_ffn)
    gates = [(model.blocks[2].gate_attn, layer.cross_attn_attn_gate), (model.blocks[3].gate_ffn,
             hf.model.language_model.layers[3].cross_attn_mlp_gate), (model.vision_global.blocks[0].gate_attn,
             hf.model.vision_model.global_transformer.layers[0].gate_attn)]
    with torch.no_grad():
        clean = model(batch)
        saved = [ours.clone() for ours, _ in gates]
        for ours, theirs in gates:
            ours.zero_()
            theirs.zero_()
        try:
            ablated, expected = model(batch), hf(**batch.as_kwargs()).logits
        finally:
            for (ours, theirs), value in zip(gates, saved):
                ours.copy_(value)
                theirs.copy_(value)
    real = batch.attention_mask.bool()
    assert max_diff(ablated, clean, real) > 1e-3 and max_diff(ablated, expected, real) <= ATOL


def test_text_rows_that_see_no_image_see_every_image_position_and_drop_their_mlp(pair):
    """HF's full-text-row masking: a row with no image to see gets a zero mask row, so it attends to every image
    position (padding tiles included), and its cross-layer MLP output is dropped; rows after the image see only
    its real tiles."""
    model, batch = pair.model, pair.batch()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("blocks.2."))
    pattern, mlp_out = cache["blocks.2.cross_attn.hook_pattern"], cache["blocks.2.hook_mlp_out"]
    row = 1  # "Describe the shape ... <|image|> ...": text before its image
    image_at = int(model.image_token_mask(batch.input_ids)[row].nonzero()[0])
    before, after = slice(0, image_at), slice(image_at, None)
    assert torch.all(pattern[row, :, before] > 0)
    assert torch.all(mlp_out[row, before] == 0) and mlp_out[row, after].abs().max() > 0
    cells = sorted((c["key"], c) for c in model.vision_cells(batch) if c["batch"] == row and c["key"] >= 0)
    real_tile = torch.tensor([bool(batch.aspect_ratio_mask[row, c["slot"], c["tile"]]) for _, c in cells])
    assert not real_tile.all(), "the image leaves padding tiles"
    assert torch.all(pattern[row, :, after][..., ~real_tile] == 0), "after its image a token sees only the real tiles"
    assert torch.allclose(pattern[row, :, after][..., real_tile].sum(-1), torch.ones(()), atol=1e-6)


def test_decompositions_with_gated_and_cross_attention_blocks(pair):
    model, batch = pair.model, pair.batch()
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(batch)
    finally:
        model.set_use_attn_result(False)
    for i, block in enumerate(model.vision_global.blocks):
        heads = cache[f"vision_global.blocks.{i}.attn.hook_result"].sum(2) * block.gate_attn.tanh()
        assert max_diff(heads, cache[f"vision_global.blocks.{i}.hook_attn_out"]) <= 1e-5
    view = model.tower("vision_global")
    _, vcache = view.run_with_cache(batch)
    n = view.cfg.n_layers
    assert max_diff(vcache.decompose_resid(layer=n).sum(0), vcache[f"blocks.{n - 1}.hook_resid_post"]) <= 1e-5
    for i in model.vlm_cfg.cross_attention_layers:
        block = model.blocks[i]
        heads = cache[f"blocks.{i}.cross_attn.hook_result"].sum(2) * block.gate_attn.tanh()
        assert max_diff(heads, cache[f"blocks.{i}.hook_cross_attn_out"]) <= 1e-5
        stream = cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_cross_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"]
        assert max_diff(stream, cache[f"blocks.{i}.hook_resid_post"]) <= 1e-5
    assert torch.count_nonzero(model.W_Q[2]) == 0 and model.W_Q.shape[0] == model.cfg.n_layers, "no self-attention"


def test_cross_attention_head_ablation_equals_hf_surgery_at_the_second_cross_layer(pair):
    """The contract ablates a head of the first cross layer; this one of the next (another head of a GQA group)."""
    model, hf, batch, layer, head = pair.model, pair.hf, pair.batch(), 3, 2
    d_head = model.cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    columns = slice(head * d_head, (head + 1) * d_head)
    linear = hf.model.language_model.layers[layer].cross_attn.o_proj
    with torch.no_grad():
        ablated = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.cross_attn.hook_z", ablate)])
        saved = linear.weight[:, columns].clone()
        linear.weight[:, columns] = 0.0
        try:
            surgery = hf(**batch.as_kwargs()).logits
        finally:
            linear.weight[:, columns] = saved
        clean = model(batch)
    real = batch.attention_mask.bool()
    assert max_diff(ablated, clean, real) > 1e-3 and max_diff(ablated, surgery, real) <= ATOL


def test_residual_patching_and_attribution_through_the_cross_attention(pair):
    model = pair.model
    clean, corrupt = (quiet(single_inputs, model, pair.entry, seed) for seed in (5, 6))
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())

    def metric(out):
        return out[0, -1, token]

    last = corrupt.shape[1] - 1
    cells = pd.DataFrame({"layer": [0, 2, 3, 4], "pos": [last] * 4})
    with torch.no_grad():  # TL's generic patching with the image attached, at a few (layer, position) cells
        result = patching.generic_activation_patch(model, corrupt, cache, metric, patching.layer_pos_patch_setter,
                                                   "resid_pre", index_df=cells)
        corrupted = metric(model(corrupt))
    for (layer, pos), value in zip(cells.itertuples(index=False), result):
        def hook(act, hook, layer=layer):
            act[:, pos] = cache[f"blocks.{layer}.hook_resid_pre"][:, pos]
            return act

        with torch.no_grad():
            expected = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)]))
        assert torch.allclose(value, expected, atol=1e-6)
    # Up to the first cross layer's input the image is not in the stream: clean and corrupted streams are equal.
    assert torch.allclose(result[:2], corrupted, atol=1e-6) and not torch.allclose(result[2:], corrupted, atol=1e-4)
    names = ("blocks.3.hook_resid_pre", "vision.blocks.0.hook_resid_pre")
    attr = attribution_patch(model, clean, corrupt, metric, lambda n: n in names)
    assert attr["blocks.3.hook_resid_pre"].shape == clean.input_ids.shape
    assert all(attr[n].abs().max() > 0 for n in names), "the image's effect flows back through the cross-attention"
    assert torch.all(attribution_patch(model, clean, corrupt, metric, lambda n: n == "blocks.0.hook_resid_pre")
                     ["blocks.0.hook_resid_pre"] == 0), "before the first cross layer, the image is not in the stream"


def test_vision_cells_index_tiles_and_patches(pair):
    model, batch = pair.model, pair.batch()
    cells = model.vision_cells(batch)
    v = model.vlm_cfg.vision
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=["vision.blocks.0.hook_resid_pre", "blocks.2.cross_attn.hook_k"])
    rows, positions = cache["vision.blocks.0.hook_resid_pre"].shape[:2]
    assert len(cells) == rows * positions and positions == v.max_num_tiles * v.padded_positions
    # Row 0: a 1x2 canvas (2 of 4 tiles real): tile 1's first patch starts one tile to the right.
    first = [c for c in cells if c["image"] == 0 and c["tile"] == 1 and c["kind"] == "patch"][0]
    assert (first["x0"], first["y0"], first["row"], first["col"]) == (v.image_size, 0, 0, 0)
    kinds = [c["kind"] for c in cells if c["image"] == 0]
    assert kinds.count("patch") == 2 * v.grid**2 and kinds.count("cls") == 2
    keys = sorted(c["key"] for c in cells if c["batch"] == 0 and c["key"] >= 0)
    assert keys == list(range(cache["blocks.2.cross_attn.hook_k"].shape[1])), "every cross-attention key, once"


def test_two_images_per_prompt_split_rows_and_keep_their_images(pair):
    inputs = pair.cases["multi_image"]
    assert inputs.pixel_values.shape[:2] == (2, 2) and inputs.aspect_ratio_ids[1, 1] == 0, "an empty image slot"
    with torch.no_grad():
        both = pair.model(inputs)
        alone = pair.model(inputs[1:2])
    assert max_diff(both[1:2], alone, inputs.attention_mask[1:2].bool()) <= 1e-5
    flat = pair.model.prepare(images=sample_images(2, seed=1, sizes=MLLAMA_SIZES), text=MLLAMA_PROMPTS)
    assert flat.pixel_values.shape[:2] == (2, 1), "a flat image list is split by the prompts' image tokens"


def test_weight_processing_is_refused(pair):
    from tl_vlm import HookedVLM

    with pytest.raises(NotImplementedError, match="cross-attention"):
        quiet(HookedVLM.from_pretrained, pair.path, fold_ln=True)


def test_text_to_image_knockout_silences_the_cross_attention(pair):
    model, batch = pair.model, pair.batch()
    gates = [(model.blocks[i].gate_attn, model.blocks[i].gate_attn.detach().clone()) for i in (2, 3)]
    with torch.no_grad():
        knocked = knockout_text_to_image(model, batch)
        for gate, _ in gates:
            gate.zero_()  # tanh(0) = 0: the cross-attention adds nothing
        try:
            silenced = model(batch)
        finally:
            for gate, value in gates:
                gate.copy_(value)
        only_last = knockout_text_to_image(model, batch, layers=[3])
    real = batch.attention_mask.bool()
    assert max_diff(knocked, silenced, real) <= 1e-5
    assert max_diff(only_last, knocked, real) > 1e-3
