"""Hook names, shapes and interventions."""

from __future__ import annotations

import torch
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import get_act_name

BLOCK_HOOKS = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_result", "mlp.hook_pre", "mlp.hook_post",
]


def test_hook_name_contract(pair):
    names = set(pair.model.hook_dict)
    for i in range(pair.model.cfg.n_layers):
        for hook in BLOCK_HOOKS + ["attn.hook_rot_q", "attn.hook_rot_k", "mlp.hook_pre_linear"]:
            assert f"blocks.{i}.{hook}" in names
    for i in range(pair.model.vision.cfg.n_layers):
        for hook in BLOCK_HOOKS:
            assert f"vision.blocks.{i}.{hook}" in names
    siglip = pair.variant == "llava_interleave_siglip"  # SigLIP has no pre-LN
    for hook in ["hook_embed", "hook_text_embed", "hook_image_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
                 "vision.hook_embed", "vision.hook_pos_embed", "projector.hook_in", "projector.hook_out",
                 "projector.mlp.hook_pre", "projector.mlp.hook_post"]:
        assert hook in names
    assert ("vision.ln_pre.hook_scale" in names) != siglip and ("vision.ln_pre.hook_normalized" in names) != siglip
    assert get_act_name("resid_post", 0) in names and get_act_name("pattern", 1) in names


def test_activation_shapes(pair):
    model, batch = pair.model, pair.batch()
    _, cache = model.run_with_cache(batch)
    assert "blocks.0.attn.hook_result" not in cache, "as in TL, caching everything skips hook_result by default"
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(batch)
    finally:
        model.set_use_attn_result(False)
    b, p = batch.shape
    cfg, vcfg = model.cfg, model.vision.cfg
    assert cache["blocks.0.hook_resid_pre"].shape == (b, p, cfg.d_model)
    assert cache["blocks.0.attn.hook_q"].shape == (b, p, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (b, p, cfg.n_key_value_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (b, cfg.n_heads, p, p)
    assert cache["blocks.0.attn.hook_result"].shape == (b, p, cfg.n_heads, cfg.d_model)
    n_images = cache["vision.blocks.0.hook_resid_pre"].shape[0]
    n_patch = (model.vlm_cfg.image_size // model.vlm_cfg.patch_size) ** 2 + (pair.variant != "llava_interleave_siglip")
    assert cache["vision.blocks.0.hook_resid_pre"].shape == (n_images, n_patch, vcfg.d_model)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (n_images, vcfg.n_heads, n_patch, n_patch)
    # The attention result summed over heads plus bias is the attention output.
    attn = model.blocks[1].attn
    summed = cache["blocks.1.attn.hook_result"].sum(2) + (attn.b_O if attn.b_O is not None else 0)
    assert torch.allclose(summed, cache["blocks.1.hook_attn_out"], atol=1e-5)


def test_embed_is_text_plus_image_exactly(pair):
    model, batch = pair.model, pair.batch()
    logits, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("embed"))
    image = model.image_token_mask(batch.input_ids)
    assert torch.equal(cache["hook_text_embed"] + cache["hook_image_embed"], cache["hook_embed"])
    assert torch.all(cache["hook_image_embed"][~image] == 0) and torch.all(cache["hook_text_embed"][image] == 0)
    # At image positions hook_embed holds the projected features, not the placeholder's embedding.
    placeholder = model.W_E[model.vlm_cfg.image_token_id]
    assert not torch.allclose(cache["hook_embed"][image][0], placeholder)
    assert torch.equal(model(batch), logits), "the split hooks change nothing"


def test_vision_head_ablation_equals_hf_surgery(llava15):
    model, batch = llava15.model, llava15.batch()
    layer, head = 0, 2
    d_head = model.vision.cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        clean = model(batch)
        ablated = model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{layer}.attn.hook_z", ablate)])
        hf = llava15.hf
        out_proj = hf.model.vision_tower.encoder.layers[layer].self_attn.out_proj
        saved = out_proj.weight[:, head * d_head : (head + 1) * d_head].clone()
        out_proj.weight[:, head * d_head : (head + 1) * d_head] = 0.0
        try:
            surgery = hf(**batch.as_kwargs()).logits
        finally:
            out_proj.weight[:, head * d_head : (head + 1) * d_head] = saved
    real = batch.attention_mask.bool()
    assert (ablated - clean)[real].abs().max() > 1e-3, "ablating a vision head must change the output"
    assert (ablated - surgery)[real].abs().max() <= 1e-4


def test_hooks_are_removed_after_run(llava15):
    model, batch = llava15.model, llava15.batch()
    model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)])
    model.run_with_cache(batch)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())


def test_stacked_weights_and_factored_matrices(pair):
    model = pair.model
    cfg = model.cfg
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_K.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)  # GQA repeated per head
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp) and model.W_gate is not None
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model) and model.W_U.shape == (cfg.d_model, cfg.d_vocab)
    assert isinstance(model.OV, FactoredMatrix) and model.OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    vcfg = model.vision.cfg
    assert model.vision.W_Q.shape == (vcfg.n_layers, vcfg.n_heads, vcfg.d_model, vcfg.d_head)
    assert model.vision.QK.shape == (vcfg.n_layers, vcfg.n_heads, vcfg.d_model, vcfg.d_model)
    # The TL-layout parameter is the tensor HF's linear layer uses.
    hf_q = pair.hf.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.blocks[0].attn.W_Q[1], hf_q[cfg.d_head : 2 * cfg.d_head].T)


def test_skipped_vision_layers_run_when_hooked(llava15):
    """Blocks past the last feature layer cannot change the output; they still run for hooks."""
    model, batch = llava15.model, llava15.batch()
    last = model.vision.cfg.n_layers - 1
    seen = []
    model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last}.hook_resid_post", lambda x, hook: seen.append(x))])
    assert len(seen) == 1


def test_every_hook_point_fires(pair):
    model, batch = pair.model, pair.batch()
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(batch)
    finally:
        model.set_use_attn_result(False)
    assert set(cache.keys()) == set(model.hook_dict), "a registered hook point that never fires is a silent no-op"


def test_feature_layer_hook_reaches_the_projector(llava15):
    """LLaVA reads vision hidden state -2, i.e. the input of the last block: hooking it must matter."""
    model, batch = llava15.model, llava15.batch()
    last = model.vision.cfg.n_layers - 1
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    with torch.no_grad():
        via_pre = model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last}.hook_resid_pre", zero)])
        via_post = model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last - 1}.hook_resid_post", zero)])
        clean = model(batch)
    assert (via_pre - clean).abs().max() > 1e-3
    assert torch.equal(via_pre, via_post)


def test_in_place_hooks_never_edit_weights(llava15):
    model, batch = llava15.model, llava15.batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def scribble(x, hook):
        x.mul_(0.5)

    model.run_with_hooks(batch, fwd_hooks=[(lambda name: True, scribble)])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"an in-place hook wrote into {name}"


def test_transformer_lens_cache_algebra(llava15):
    from transformer_lens import SVDInterpreter

    model, batch = llava15.model, llava15.batch()
    logits, cache = model.run_with_cache(batch)
    n = model.cfg.n_layers
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    parts = cache.get_full_resid_decomposition(expand_neurons=False)
    assert torch.allclose(parts.sum(0), final, atol=1e-4), "components (image features included) sum to the stream"
    decomposed = cache.decompose_resid()
    assert torch.allclose(decomposed.sum(0), final, atol=1e-5)
    accumulated = cache.accumulated_resid(apply_ln=True)
    assert accumulated.shape[0] == n + 1
    token = int(logits[0, -1].argmax())
    direct = cache.logit_attrs(decomposed[:, :, -1], tokens=torch.tensor([token, token]), pos_slice=-1)
    assert direct.shape == decomposed.shape[:2]
    singular = SVDInterpreter(model).get_singular_vectors("OV", layer_index=0, head_index=1)
    assert singular.shape[0] == model.cfg.d_vocab, "singular vectors read out in the vocabulary"


def test_hooked_layernorm_is_fp32_stable():
    from tl_vlm.components import LayerNorm

    norm = LayerNorm(8, 1e-5).half()
    x = torch.randn(2, 3, 8).half()
    x[0, 0, 0] = 400.0
    fast = norm(x)
    norm.hook_scale.add_hook(lambda t, hook: None)
    assert torch.allclose(norm(x).float(), fast.float(), atol=1e-2)
