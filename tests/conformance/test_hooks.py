"""Hook-name contract, every hook point fires, activation shapes, and hooks that never leak or edit weights."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import get_act_name

from conformance.registry import attention_layers, params, tower_of

# Every block of every tower has these (the Q-Former's BERT blocks add hook_normalized_resid_post).
BLOCK_HOOKS = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_result", "mlp.hook_pre", "mlp.hook_post",
]
# A language block whose only attention is cross-attention (Mllama; the registry's ``cross_only_blocks``).
CROSS_ONLY_BLOCK_HOOKS = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_cross_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "cross_attn.hook_q", "cross_attn.hook_k", "cross_attn.hook_v", "cross_attn.hook_z", "cross_attn.hook_attn_scores",
    "cross_attn.hook_pattern", "cross_attn.hook_result", "mlp.hook_pre", "mlp.hook_post",
]
# A mixture-of-experts block: the router's hooks, and each expert's MLP hooks under mlp.experts.{e}.
MOE_BLOCK_HOOKS = [h for h in BLOCK_HOOKS if not h.startswith("mlp.")] + [
    "mlp.hook_router_logits", "mlp.hook_expert_indices", "mlp.hook_expert_weights", "mlp.experts.0.hook_pre",
    "mlp.experts.0.hook_post", "mlp.experts.0.hook_out",
]
CROSS_HOOKS = ["cross_attn.hook_q", "cross_attn.hook_k", "cross_attn.hook_v", "cross_attn.hook_z",
               "cross_attn.hook_pattern", "cross_attn.hook_result"]


def prefix(tower: str) -> str:
    return "" if tower == "language" else f"{tower}."


def cache_everything(model, inputs):
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            return model.run_with_cache(inputs)
    finally:
        model.set_use_attn_result(False)


@pytest.mark.parametrize("name", params())
def test_hook_name_contract(loaded, name):
    pair = loaded(name)
    model, names = pair.model, set(pair.model.hook_dict)
    assert set(model.towers()) == set(pair.entry.towers), "the registry declares the model's towers"
    for tower in pair.entry.towers:
        for i in range(model.tower(tower).cfg.n_layers):
            if tower == "language" and i in pair.entry.cross_only_blocks:
                expected = CROSS_ONLY_BLOCK_HOOKS
            elif tower == "language" and i in pair.entry.moe_blocks:
                expected = MOE_BLOCK_HOOKS
            else:
                expected = BLOCK_HOOKS
            missing = [h for h in expected if f"{prefix(tower)}blocks.{i}.{h}" not in names]
            assert not missing, f"{tower} block {i} lacks {missing}"
    for attention, i in [(a, i) for a in pair.entry.attentions
                         for i in attention_layers(pair.entry, a, model.tower(tower_of(a)).cfg.n_layers)]:
        if attention.endswith("cross_attn") and attention.startswith("qformer"):
            has = all(f"{attention.format(i)}.{h.split('.')[1]}" in names for h in CROSS_HOOKS)
            assert has == (i % 2 == 0), "the Q-Former cross-attends every 2nd layer"
        elif attention.endswith("cross_attn"):
            assert all(f"{attention.format(i)}.{h.split('.')[1]}" in names for h in CROSS_HOOKS)
    assert set(pair.entry.extra_hooks) <= names, sorted(set(pair.entry.extra_hooks) - names)
    assert not set(pair.entry.absent_hooks) & names
    if not model.capabilities.encoder_decoder:
        assert get_act_name("resid_post", 0) in names and get_act_name("pattern", 1) in names


@pytest.mark.parametrize("name", params())
def test_every_hook_point_fires_with_tl_shapes(loaded, name):
    pair = loaded(name)
    model, batch = pair.model, pair.batch()
    with torch.no_grad():
        _, default = model.run_with_cache(batch)
    assert not any(n.endswith("hook_result") for n in default.keys()), "as in TL, caching everything skips hook_result"
    _, cache = cache_everything(model, batch)
    assert set(cache.keys()) == set(model.hook_dict), "a registered hook point that never fires is a silent no-op"
    for tower in pair.entry.towers:
        view, p = model.tower(tower), prefix(tower)
        cfg = view.cfg
        q, pattern = cache[f"{p}blocks.0.attn.hook_q"], cache[f"{p}blocks.0.attn.hook_pattern"]
        rows, pos = q.shape[:2]
        assert cache[f"{p}blocks.0.hook_resid_pre"].shape == (rows, pos, cfg.d_model), tower
        assert q.shape == (rows, pos, cfg.n_heads, cfg.d_head), tower
        assert cache[f"{p}blocks.0.attn.hook_k"].shape[-2] in (cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads)
        assert pattern.shape == (rows, cfg.n_heads, pos, pattern.shape[-1]), tower
        assert cache[f"{p}blocks.0.attn.hook_result"].shape == (rows, pos, cfg.n_heads, cfg.d_model), tower
        if f"test_every_hook_point_fires_with_tl_shapes[{tower}]" in pair.entry.not_applicable:
            continue  # declared: this tower's attention output is not the sum of its heads' results
        # The attention result summed over heads plus bias is the attention output.
        attn = view.blocks[-1].attn
        summed = cache[f"{p}blocks.{cfg.n_layers - 1}.attn.hook_result"].sum(2) + (attn.b_O if attn.b_O is not None else 0)
        if cfg.use_normalization_before_and_after:  # Gemma 2 / 3: the heads' sum is the post-norm's input
            summed = view.blocks[-1].ln1_post(summed)
        assert torch.allclose(summed, cache[f"{p}blocks.{cfg.n_layers - 1}.hook_attn_out"], atol=1e-5), tower
    if not model.capabilities.encoder_decoder:
        assert cache["blocks.0.hook_resid_pre"].shape[:2] == batch.shape


@pytest.mark.parametrize("name", params())
def test_embed_is_text_plus_image_exactly(loaded, name):
    pair = loaded(name)
    model, batch = pair.model, pair.batch()
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("embed"))
        plain = model(batch)
    image = model.image_token_mask(batch.input_ids)
    assert image.any()
    assert torch.equal(cache["hook_text_embed"] + cache["hook_image_embed"], cache["hook_embed"])
    if not model.capabilities.image_positions:  # images enter by cross-attention: the stream is all token embeddings
        assert torch.all(cache["hook_image_embed"] == 0) and torch.equal(cache["hook_embed"], model.W_E[batch.input_ids])
        assert torch.equal(plain, logits), "the split hooks change nothing"
        return
    assert torch.all(cache["hook_image_embed"][~image] == 0) and torch.all(cache["hook_text_embed"][image] == 0)
    # At image positions hook_embed holds the projected features, not the placeholder's embedding.
    placeholder = model.W_E[batch.input_ids[image][0]]
    assert not torch.allclose(cache["hook_embed"][image][0], placeholder)
    assert torch.equal(plain, logits), "the split hooks change nothing"


@pytest.mark.parametrize("name", params())
def test_hooks_are_removed_and_never_edit_weights(loaded, name):
    pair = loaded(name)
    model, batch = pair.model, pair.batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def scribble(x, hook):
        if x.is_floating_point():  # not the chosen experts' indices (MoE)
            x.mul_(0.5)

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(lambda n: True, scribble)])
        model.run_with_cache(batch)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"an in-place hook wrote into {n}"


@pytest.mark.parametrize("name, tower", params(lambda e: e.towers))
def test_stacked_weights_and_factored_matrices(loaded, name, tower):
    view = loaded(name).model.tower(tower)
    cfg = view.cfg
    assert view.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert view.W_K.shape[:2] == (cfg.n_layers, cfg.n_heads)  # GQA repeated per head
    assert view.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    if not (tower == "language" and loaded(name).entry.moe_blocks):  # experts have their own W_in
        assert view.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert isinstance(view.OV, FactoredMatrix) and view.OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert view.QK.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
