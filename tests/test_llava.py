"""LLaVA-only behaviour (the shared contract is tests/conformance): the CLIP class token and feature layer,
vision blocks past the feature layer, and TL's by-position head patching on the image prompt."""

from __future__ import annotations

import torch
from conftest import PROMPTS
from transformer_lens import patching

from tl_vlm.zoo.data import sample_images


def test_vision_rows_hold_every_patch_and_the_class_token(pair):
    model, batch = pair.model, pair.batch()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("vision.blocks.0."))
    vcfg = model.vision.cfg
    n_images = cache["vision.blocks.0.hook_resid_pre"].shape[0]
    n_patch = model.vlm_cfg.vision.grid**2 + model.vlm_cfg.vision.class_token  # SigLIP has no class token
    assert cache["vision.blocks.0.hook_resid_pre"].shape == (n_images, n_patch, vcfg.d_model)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (n_images, vcfg.n_heads, n_patch, n_patch)


def test_skipped_vision_layers_run_when_hooked(llava15):
    """Blocks past the last feature layer cannot change the output; they still run for hooks."""
    model, batch = llava15.model, llava15.batch()
    last = model.vision.cfg.n_layers - 1
    seen = []
    model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last}.hook_resid_post", lambda x, hook: seen.append(x))])
    assert len(seen) == 1


def test_feature_layer_hook_reaches_the_projector(llava15):
    """LLaVA reads vision hidden state -2, i.e. the input of the last block: hooking it must matter."""
    model, batch = llava15.model, llava15.batch()
    last = model.vision.cfg.n_layers - 1
    zero = lambda x, hook: torch.zeros_like(x)
    with torch.no_grad():
        via_pre = model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last}.hook_resid_pre", zero)])
        via_post = model.run_with_hooks(batch, fwd_hooks=[(f"vision.blocks.{last - 1}.hook_resid_post", zero)])
        clean = model(batch)
    assert (via_pre - clean).abs().max() > 1e-3
    assert torch.equal(via_pre, via_post)


def test_head_patching_by_position(llava15):
    """TL's [layer, pos, head] patching runs with the image attached (the contract checks the all-position form
    against a hand loop on every entry; this one costs a run per layer, position and head, so one model)."""
    model = llava15.model
    clean, corrupt = (model.prepare(images=sample_images(1, seed=s), text=PROMPTS[0]) for s in (5, 6))
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
        token = int(logits[0, -1].argmax())
        by_pos = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, cache, lambda out: out[0, -1, token])
    assert by_pos.shape == (model.cfg.n_layers, corrupt.shape[1], model.cfg.n_heads) and by_pos.abs().max() > 0
