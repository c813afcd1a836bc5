"""TransformerLens' own tools, unchanged, on HookedVLM: images attached on every run, every tower reachable."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

from conftest import PROMPTS, NON_SQUARE
from tl_vlm.zoo.data import sample_images


@pytest.fixture(scope="module")
def experiment(pair):
    """Clean and corrupted inputs that differ only in the image, and the answer-logit metric."""
    model = pair.model
    sizes = NON_SQUARE[:1] if pair.variant == "llava_next_mistral" else None
    clean = model.prepare(images=sample_images(1, seed=5, sizes=sizes), text=PROMPTS[0])
    corrupt = model.prepare(images=sample_images(1, seed=6, sizes=sizes), text=PROMPTS[0])
    assert torch.equal(clean.input_ids, corrupt.input_ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    return model, clean, corrupt, cache, (lambda out: out[0, -1, token])


def manual_patch(model, corrupt, cache, metric, name_of, n_layers, positions, setter):
    out = torch.zeros(n_layers, positions)
    for layer in range(n_layers):
        name = name_of(layer)
        for pos in range(positions):
            def hook(act, hook, pos=pos, name=name):
                return setter(act, cache[name], pos)

            with torch.no_grad():
                out[layer, pos] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
    return out


def set_pos(act, clean, pos):
    act[:, pos] = clean[:, pos]
    return act


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "attn_out", "mlp_out"])
def test_language_layer_pos_patching_matches_manual_loop(experiment, kind):
    model, clean, corrupt, cache, metric = experiment
    tl_fn = getattr(patching, f"get_act_patch_{kind}")
    with torch.no_grad():
        result = tl_fn(model, corrupt, cache, metric)
    expected = manual_patch(
        model, corrupt, cache, metric, lambda l: f"blocks.{l}.hook_{kind}", model.cfg.n_layers, corrupt.shape[1], set_pos
    )
    assert torch.allclose(result.cpu(), expected, atol=1e-6)
    assert result.abs().max() > 0 and not torch.allclose(result, result[0, 0]), "the image must matter somewhere"


def test_head_patching_and_block_every(experiment):
    model, clean, corrupt, cache, metric = experiment
    with torch.no_grad():
        all_pos = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)
        by_pos = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, cache, metric)
        every = patching.get_act_patch_block_every(model, corrupt, cache, metric)
    expected = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            def hook(z, hook, layer=layer, head=head):
                z[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return z

            with torch.no_grad():
                expected[layer, head] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]))
    assert torch.allclose(all_pos.cpu(), expected, atol=1e-6)
    assert by_pos.shape == (model.cfg.n_layers, corrupt.shape[1], model.cfg.n_heads)
    assert every.shape == (3, model.cfg.n_layers, corrupt.shape[1])
    # Patching the whole residual stream before layer 0 at every position restores the clean run exactly.
    with torch.no_grad():
        restored = model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: cache["blocks.0.hook_resid_pre"])])
    assert torch.allclose(metric(restored), metric(model(clean)), atol=1e-5)


def test_vision_tower_view_patching(experiment):
    model, clean, corrupt, cache, metric = experiment
    vision = model.tower("vision")
    _, vcache = vision.run_with_cache(clean)
    corrupt_v = vision.inputs(corrupt)
    n_images, n_patches = corrupt_v.shape
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(vision, corrupt_v, vcache, metric)
    assert result.shape == (vision.cfg.n_layers, n_patches)
    expected = manual_patch(
        model, corrupt, cache, metric, lambda l: f"vision.blocks.{l}.hook_resid_pre", vision.cfg.n_layers, n_patches, set_pos
    )
    assert torch.allclose(result.cpu(), expected, atol=1e-6)
    heads = patching.get_act_patch_attn_head_out_all_pos(vision, corrupt_v, vcache, metric)
    assert heads.shape == (vision.cfg.n_layers, vision.cfg.n_heads)


def test_image_free_input_raises(experiment):
    model, clean, corrupt, cache, metric = experiment
    with pytest.raises(ValueError, match="pixel_values"):
        patching.get_act_patch_resid_pre(model, corrupt.input_ids, cache, metric)
    vision = model.tower("vision")
    _, vcache = vision.run_with_cache(clean)
    with pytest.raises(ValueError, match="images"):
        patching.get_act_patch_resid_pre(vision, corrupt.input_ids, vcache, metric)


@pytest.mark.parametrize("tower", ["language", "vision"])
def test_decompositions_are_exact_at_every_position(experiment, tower):
    model, clean, *_ = experiment
    view = model.tower(tower)
    _, cache = view.run_with_cache(clean)
    n = view.cfg.n_layers
    for layer in range(n + 1):
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        assert (cache.decompose_resid(layer=layer).sum(0) - target).abs().max() <= 1e-5, f"{tower} layer {layer}"
        if layer < n:
            mid = cache.decompose_resid(layer=layer, mlp_input=True).sum(0)
            assert (mid - cache[f"blocks.{layer}.hook_resid_mid"]).abs().max() <= 1e-5
    heads = cache.stack_head_results(layer=n)
    attn_sum = heads.sum(0) + sum(b.attn.b_O for b in view.blocks if b.attn.b_O is not None)
    assert (attn_sum - sum(cache[f"blocks.{l}.hook_attn_out"] for l in range(n))).abs().max() <= 1e-4
    neurons = cache.get_neuron_results(0)
    mlp = neurons.sum(-2) + (view.blocks[0].mlp.b_out if view.blocks[0].mlp.b_out is not None else 0)
    assert (mlp - cache["blocks.0.hook_mlp_out"]).abs().max() <= 1e-4
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    assert (full.sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() <= 1e-4


def test_logit_lens_through_the_final_norm(experiment):
    model, clean, *_ = experiment
    logits, cache = model.run_with_cache(clean)
    # accumulated_resid(apply_ln=True) runs ln_final itself; apply_ln_to_stack only divides by the cached
    # scale, so the norm's weight is folded (fold_ln) or applied by hand.
    w = model.ln_final.w
    lens = cache.accumulated_resid(apply_ln=True) @ model.W_U
    assert torch.allclose(lens[-1], logits, atol=1e-4), "the last layer of the lens is the model's logits"
    normed = cache.apply_ln_to_stack(cache.decompose_resid(), layer=model.cfg.n_layers)
    assert torch.allclose(normed.sum(0) * w @ model.W_U, logits, atol=1e-4)
