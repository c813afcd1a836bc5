"""TransformerLens' own tools, unchanged, on every entry: patching with images attached equals hand-written
hook loops in every tower, residual decompositions are exact, the logit lens ends at the logits."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import SVDInterpreter, patching

from conformance.registry import not_applicable, params, quiet, single_inputs
from tl_vlm.analysis.attribution import attribution_patch
from tl_vlm.components.embeddings import soft_cap

ENCODER_DECODER = "capabilities.encoder_decoder: no top-level blocks; the encoder / decoder towers are tested as views"


@pytest.fixture(scope="session")
def experiments(loaded):
    made = {}

    def get(name):
        if name not in made:
            pair = loaded(name)
            model = pair.model
            clean, corrupt = (quiet(single_inputs, model, pair.entry, seed) for seed in (5, 6))
            assert torch.equal(clean.input_ids, corrupt.input_ids)
            with torch.no_grad():
                logits, cache = model.run_with_cache(clean)
            token = int(logits[0, -1].argmax())
            made[name] = (model, clean, corrupt, cache, (lambda out, token=token: out[0, -1, token]))
        return made[name]

    return get


def positions_to_check(model, inputs) -> list[int]:
    """The manual loops check a few positions (TL's functions compute all): the first, two image tokens,
    the last image token and the last position."""
    image = model.image_token_mask(inputs.input_ids)[0].nonzero()[:, 0].tolist()
    return sorted({0, *image[:2], image[-1], inputs.shape[1] - 1}) if image else [0, inputs.shape[1] - 1]


def manual_patch(model, corrupt, cache, metric, name_of, n_layers, positions):
    """What TL's layer-by-position patching computes, as a plain loop of hooked runs."""
    out = torch.zeros(n_layers, len(positions))
    for layer in range(n_layers):
        name = name_of(layer)
        for j, pos in enumerate(positions):
            def hook(act, hook, pos=pos, name=name):
                act[:, pos] = cache[name][:, pos]
                return act

            with torch.no_grad():
                out[layer, j] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
    return out


@pytest.mark.parametrize("name", params())
def test_language_patching_matches_manual_loops(loaded, experiments, name):
    not_applicable(loaded(name).entry, "test_language_patching_matches_manual_loops")
    model, clean, corrupt, cache, metric = experiments(name)
    if model.capabilities.encoder_decoder:
        pytest.skip(ENCODER_DECODER)
    n, positions = model.cfg.n_layers, positions_to_check(model, corrupt)
    with torch.no_grad():
        every = patching.get_act_patch_block_every(model, corrupt, cache, metric)  # resid_pre, attn_out, mlp_out
        mid = patching.get_act_patch_resid_mid(model, corrupt, cache, metric)
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)
    assert every.shape == (3, n, corrupt.shape[1])
    for result, kind in zip([*every, mid], ["resid_pre", "attn_out", "mlp_out", "resid_mid"]):
        expected = manual_patch(model, corrupt, cache, metric, lambda l, kind=kind: f"blocks.{l}.hook_{kind}", n, positions)
        assert torch.allclose(result[:, positions].cpu(), expected, atol=1e-6), kind
        assert result.abs().max() > 0 and not torch.allclose(result, result[0, 0]), "the image must matter somewhere"
    expected = torch.zeros(n, model.cfg.n_heads)
    for layer in range(n):
        for head in range(model.cfg.n_heads):
            def hook(z, hook, layer=layer, head=head):
                z[:, :, head] = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return z

            with torch.no_grad():
                expected[layer, head] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]))
    assert torch.allclose(heads.cpu(), expected, atol=1e-6)
    # Patching the whole residual stream before layer 0 at every position (and the DeepStack terms, which carry the
    # image past it) restores the clean run exactly.
    restore = ["blocks.0.hook_resid_pre", *(f"blocks.{k}.hook_deepstack" for k in range(model.cfg.deepstack_layers))]
    with torch.no_grad():
        restored = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda a, hook: cache[hook.name]) for name in restore])
        assert torch.allclose(metric(restored), metric(model(clean)), atol=1e-5)


@pytest.mark.parametrize("name, tower", params(lambda e: [t for t in e.towers if t != "language"]))
def test_tower_view_patching_matches_manual_loop(experiments, name, tower):
    model, clean, corrupt, cache, metric = experiments(name)
    view = model.tower(tower)
    _, vcache = view.run_with_cache(clean)
    corrupt_v = view.inputs(corrupt)
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(view, corrupt_v, vcache, metric)
        heads = patching.get_act_patch_attn_head_out_all_pos(view, corrupt_v, vcache, metric)
    assert result.shape == (view.cfg.n_layers, corrupt_v.shape[1])
    positions = sorted({0, 1, corrupt_v.shape[1] // 2, corrupt_v.shape[1] - 1})
    expected = manual_patch(model, corrupt, cache, metric, lambda l: f"{tower}.blocks.{l}.hook_resid_pre",
                            view.cfg.n_layers, positions)
    assert torch.allclose(result[:, positions].cpu(), expected, atol=1e-6)
    assert heads.shape == (view.cfg.n_layers, view.cfg.n_heads) and heads.abs().max() > 0


@pytest.mark.parametrize("name", params())
def test_image_free_input_raises(experiments, name):
    model, clean, corrupt, cache, metric = experiments(name)
    if not model.capabilities.encoder_decoder:
        with pytest.raises(ValueError, match="pixel_values"):
            patching.get_act_patch_resid_pre(model, corrupt.input_ids, cache, metric)
    vision = model.tower("vision")
    _, vcache = vision.run_with_cache(clean)
    with pytest.raises(ValueError, match="images"):
        patching.get_act_patch_resid_pre(vision, corrupt.input_ids, vcache, metric)


NOT_ADDITIVE = {
    "qformer": "post-LN BERT blocks renormalise the stream after every block: it is not a sum of components",
    "decoder": "T5 decoder blocks add a cross-attention output, which TL's decompose_resid does not count",
}


@pytest.mark.parametrize("name, tower", params(lambda e: e.towers))
def test_decompositions_are_exact_at_every_position(loaded, experiments, name, tower):
    not_applicable(loaded(name).entry, "test_decompositions_are_exact_at_every_position", tower)
    if tower in NOT_ADDITIVE:
        pytest.skip(NOT_ADDITIVE[tower])
    model, clean, *_ = experiments(name)
    view = model.tower(tower)
    _, cache = view.run_with_cache(clean)
    n = view.cfg.n_layers
    for layer in range(n + 1):
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        assert (cache.decompose_resid(layer=layer).sum(0) - target).abs().max() <= 1e-5, f"{tower} layer {layer}"
        if layer < n:
            mid = cache.decompose_resid(layer=layer, mlp_input=True).sum(0)
            assert (mid - cache[f"blocks.{layer}.hook_resid_mid"]).abs().max() <= 1e-5
    if view.cfg.use_normalization_before_and_after:
        return  # Gemma 2 / 3: heads and neurons write through a post-norm, so they are not parts of the stream
    heads = cache.stack_head_results(layer=n)
    attn_sum = heads.sum(0) + sum(b.attn.b_O for b in view.blocks if b.attn.b_O is not None)
    assert (attn_sum - sum(cache[f"blocks.{l}.hook_attn_out"] for l in range(n))).abs().max() <= 1e-4
    neurons = cache.get_neuron_results(0)
    mlp = neurons.sum(-2) + (view.blocks[0].mlp.b_out if view.blocks[0].mlp.b_out is not None else 0)
    assert (mlp - cache["blocks.0.hook_mlp_out"]).abs().max() <= 1e-4
    full = cache.get_full_resid_decomposition(expand_neurons=False)
    assert (full.sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", params())
def test_logit_lens_and_cache_algebra(loaded, experiments, name):
    not_applicable(loaded(name).entry, "test_logit_lens_and_cache_algebra")
    model, clean, *_ = experiments(name)
    if model.capabilities.encoder_decoder:
        pytest.skip(ENCODER_DECODER)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    n = model.cfg.n_layers
    # accumulated_resid(apply_ln=True) runs ln_final itself; apply_ln_to_stack only divides by the cached
    # scale, so the norm's weight (and bias) are applied by hand.
    lens = cache.accumulated_resid(apply_ln=True) @ model.W_U + (model.b_U if model.b_U is not None else 0)
    lens = soft_cap(lens, model.cfg.output_logits_soft_cap)  # Gemma 2 caps its logits
    assert lens.shape[0] == n + 1
    assert torch.allclose(lens[-1], logits, atol=1e-4), "the last layer of the lens is the model's logits"
    decomposed = cache.decompose_resid()
    assert torch.allclose(decomposed.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-5)
    if model.cfg.normalization_type.startswith("RMS"):
        normed = cache.apply_ln_to_stack(decomposed, layer=n)
        assert torch.allclose(soft_cap(normed.sum(0) * model.ln_final.w @ model.W_U, model.cfg.output_logits_soft_cap),
                              logits, atol=1e-4)
    token = int(logits[0, -1].argmax())
    direct = cache.logit_attrs(decomposed[:, :, -1], tokens=torch.tensor([token]), pos_slice=-1)
    assert direct.shape == decomposed.shape[:2]
    singular = SVDInterpreter(model).get_singular_vectors("OV", layer_index=0, head_index=1)
    assert singular.shape[0] == model.cfg.d_vocab, "singular vectors read out in the vocabulary"


@pytest.mark.parametrize("name", params())
def test_attribution_patching_reaches_the_first_block(loaded, experiments, name):
    not_applicable(loaded(name).entry, "test_attribution_patching_reaches_the_first_block")
    model, clean, corrupt, _, metric = experiments(name)
    hook = "encoder.blocks.0.hook_resid_pre" if model.capabilities.encoder_decoder else "blocks.0.hook_resid_pre"
    attr = attribution_patch(model, clean, corrupt, metric, lambda n: n == hook)
    assert attr[hook].shape == clean.input_ids.shape and attr[hook].abs().max() > 0
