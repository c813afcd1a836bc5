"""TransformerLens 4.3's ``tools.analysis`` run unchanged on a HookedVLM with images (each against a hand
computation or loop), and the tools that cannot apply refuse clearly."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from toy_batches import toy, toy_batch

from tl_vlm import HookedVLM
from tl_vlm.zoo.data import sample_images

if tuple(int(part) for part in version("transformer-lens").split(".")[:2]) < (4, 3):
    pytest.skip("the tools.analysis suite tested here is TransformerLens 4.3's", allow_module_level=True)
from transformer_lens.tools import analysis  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    model = toy()
    batch = toy_batch(model, 4)
    answer = int(model(batch[0:1])[0, -1].argmax())
    return model, batch, answer


def _hand_lens(model, cache, layer: int) -> torch.Tensor:
    """Logits of the stream entering block ``layer`` (n_layers: the final stream) at the last position."""
    name = f"blocks.{layer}.hook_resid_pre" if layer < model.cfg.n_layers else f"blocks.{layer - 1}.hook_resid_post"
    return model.unembed(model.ln_final(cache[name][:, -1:]))[:, 0]


def test_logit_lens_matches_a_hand_readout(setup):
    model, batch, _ = setup
    result = analysis.logit_lens(model, batch)
    _, cache = model.run_with_cache(batch)
    assert result.labels[-1] == "final_post"
    for i in range(model.cfg.n_layers + 1):
        assert torch.allclose(result.readout.values[i], _hand_lens(model, cache, i), atol=ATOL)
    assert torch.allclose(cache.logit_lens().readout.values, result.readout.values, atol=ATOL)


def test_direct_logit_attribution_sums_to_the_answer_logit(setup):
    # As on HookedTransformer, DLA needs the final norm folded into W_U (fold_ln=True).
    _, batch, answer = setup
    model = HookedVLM.from_pretrained("tl-vlm/toy-llava", fold_ln=True)
    dla = analysis.direct_logit_attribution(model, batch[0:1], answer)
    logit = model(batch[0:1])[0, -1, answer] - model.b_U[answer]
    assert torch.allclose(dla.attribution.sum(0).squeeze(), logit, atol=1e-3)
    _, cache = model.run_with_cache(batch[0:1])
    stack = cache.decompose_resid(pos_slice=-1, apply_ln=True)[:, 0] @ model.W_U[:, answer]
    assert torch.allclose(dla.attribution.squeeze(), stack.squeeze(), atol=1e-3)


def test_node_attribution_patching_equals_a_hand_gradient(setup):
    model, batch, answer = setup
    clean, corrupt = batch[0:1], batch[2:3]

    def metric(logits):
        return logits[0, -1, answer]

    result = analysis.attribution_patch(model, clean, corrupt, metric)
    _, clean_cache = model.run_with_cache(clean)
    grads = {}
    name = "blocks.1.attn.hook_z"
    def keep(key):
        def hook(x, hook):
            grads[key] = x.detach()
        return hook

    with model.hooks(fwd_hooks=[(name, keep("act"))], bwd_hooks=[(name, keep("grad"))]):
        metric(model(corrupt)).backward()
    model.zero_grad(set_to_none=True)
    hand = ((clean_cache[name] - grads["act"]) * grads["grad"]).sum(-1)[0]  # [pos, head]
    scores = {(n.position, n.head): s for n, s in result.node_scores.items() if n.kind == "attn_head_out" and n.layer == 1}
    for (pos, head), score in scores.items():
        assert score == pytest.approx(float(hand[pos, head]), abs=1e-4)
    assert len(scores) == hand.numel()


def _metric(answer):
    return lambda logits: logits[0, -1, answer]


def _check_edges_by_hand(model, tool_model, clean, corrupt, metric) -> None:
    """Edge scores from head (0, s) to head (1, d)'s query input against clean-minus-corrupt write of (0, s) dotted
    with the gradient at (1, d)'s own query input; ``tool_model`` is a model or a tower view."""
    result = analysis.attribution_patch(tool_model, clean, corrupt, metric, analysis.EdgeAttributionConfig(granularity="edge"))
    assert not tool_model.cfg.use_split_qkv_input and not tool_model.cfg.use_hook_mlp_in  # the caller's flags come back
    assert "blocks.1.attn.hook_q_input" not in tool_model.hook_dict
    tool_model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean_cache = tool_model.run_with_cache(clean)
        acts = {}

        def keep(key):
            def hook(x, hook):
                acts[key] = x.detach()
            return hook

        writes = [("blocks.0.attn.hook_z", keep("z"))]
        reads = [("blocks.1.attn.hook_q_input", keep("grad"))]
        with tool_model.hooks(fwd_hooks=writes, bwd_hooks=reads):
            metric(tool_model(corrupt)).backward()
    finally:
        tool_model.set_use_split_qkv_input(False)
        model.zero_grad(set_to_none=True)
    W_O = tool_model.blocks[0].attn.W_O.detach()  # [head, d_head, d_model]
    delta = torch.einsum("phd,hdm->phm", clean_cache["blocks.0.attn.hook_z"][0] - acts["z"][0], W_O)
    hand = torch.einsum("psm,pdm->psd", delta, acts["grad"][0])  # [pos, src head, dst head]
    checked = 0
    for (src, dst), score in result.edge_scores.items():
        if src.kind == "attn_head_out" and src.layer == 0 and dst.kind == "q_input" and dst.layer == 1:
            assert src.position == dst.position
            assert score == pytest.approx(float(hand[src.position, src.head, dst.head]), abs=1e-4)
            checked += 1
    assert checked == hand.numel()
    everything = analysis.faithfulness(tool_model, clean, corrupt, metric, list(result.edge_scores))
    nothing = analysis.faithfulness(tool_model, clean, corrupt, metric, [])
    # every edge kept is the clean run, none kept the corrupt run (exact ablations, not linearised)
    assert everything.recovered == pytest.approx(1.0, abs=1e-3) and nothing.recovered == pytest.approx(0.0, abs=1e-3)
    assert everything.circuit_size == everything.total_edges == len(result.edge_scores)


def test_edge_attribution_equals_a_hand_gradient(setup):
    model, batch, answer = setup
    _check_edges_by_hand(model, model, batch[0:1], batch[2:3], _metric(answer))


def test_edge_attribution_in_the_vision_tower_through_its_view():
    # BLIP-2 reads its ViT's last layer (LLaVA's last vision layer reaches no logit, which the tool refuses).
    model = HookedVLM.from_pretrained("tl-vlm/toy-blip2")
    batch = model.prepare(images=sample_images(2, seed=3), text=["Question: what colour? Answer:"] * 2)
    answer = int(model(batch[0:1])[0, -1].argmax())
    view = model.tower("vision")
    _check_edges_by_hand(model, view, view.inputs(batch[0:1]), view.inputs(batch[1:2]), _metric(answer))
    assert "vision.blocks.1.attn.hook_q_input" not in model.hook_dict


def test_direct_path_patching_equals_a_hand_patched_query(setup):
    model, batch, answer = setup
    clean, corrupt = batch[0:1], batch[2:3]
    metric = _metric(answer)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupt_cache = model.run_with_cache(corrupt)
        result = analysis.get_act_patch_direct_path(model, corrupt, clean_cache, corrupt_cache, metric, 0, 1)
        assert "blocks.1.attn.hook_q_input" not in model.hook_dict
        # By hand, without the per-head fork: head (1, d)'s query recomputed from its stream plus head (0, 1)'s
        # clean-minus-corrupt write, through ln1 and W_Q.
        attn = model.blocks[1].attn
        z = "blocks.0.attn.hook_z"
        delta = (clean_cache[z][:, :, 1] - corrupt_cache[z][:, :, 1]) @ model.blocks[0].attn.W_O[1]
        for d in range(model.cfg.n_heads):
            stream = corrupt_cache["blocks.1.hook_resid_pre"] + delta
            query = model.blocks[1].ln1(stream) @ attn.W_Q[d] + (attn.b_Q[d] if attn.b_Q is not None else 0)

            def patch(q, hook, d=d, query=query):
                q = q.clone()
                q[:, :, d] = query
                return q

            expected = metric(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.attn.hook_q", patch)]))
            assert float(result[1, d]) == pytest.approx(float(expected), abs=1e-4)


def test_split_inputs_leave_the_model_unchanged_and_edit_one_head(setup):
    model, batch, _ = setup
    with torch.no_grad():
        expected = model(batch)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        try:
            logits, cache = model.run_with_cache(batch)
            assert cache["blocks.0.attn.hook_q_input"].shape == (*batch.shape, model.cfg.n_heads, model.cfg.d_model)
            assert cache["blocks.0.attn.hook_k_input"].shape[2] == model.cfg.n_key_value_heads
            assert torch.equal(cache["blocks.1.hook_mlp_in"], cache["blocks.1.hook_resid_mid"])
            # the new hook points fire (per-head results are cached only with use_attn_result, as in TL)
            assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith("hook_result")}
            assert (logits - expected).abs().max() <= ATOL
            zero = [("blocks.1.attn.hook_q_input", lambda x, hook: x.index_fill(2, torch.tensor([0]), 0.0))]
            edited = model.run_with_hooks(batch, fwd_hooks=zero)
            assert (edited - expected).abs().max() > 1e-4
        finally:
            model.set_use_split_qkv_input(False)
            model.set_use_hook_mlp_in(False)
    assert "blocks.1.hook_mlp_in" not in model.hook_dict


def _task(model):
    return lambda inputs: model(inputs)[:, -1, :8]


def test_interchange_collects_and_intervenes_with_images(setup):
    model, batch, _ = setup
    name, last = "blocks.1.hook_resid_pre", torch.full((4,), batch.shape[1] - 1)
    acts = analysis.collect_activations(model, name, batch, _task(model), positions=last, batch_size=3)
    _, cache = model.run_with_cache(batch)
    assert torch.allclose(acts, cache[name][:, -1], atol=ATOL)
    # A full-rank interchange writes the source's activation: the same as a hand patch at that position.
    basis = torch.eye(model.cfg.d_model)
    source = acts[[1, 0, 3, 2]]
    out = analysis.run_with_intervention(model, name, analysis.SubspaceInterchange(basis), batch, source, _task(model),
                                         positions=last)

    def patch(x, hook):
        x = x.clone()
        x[:, -1] = source
        return x

    hand = model.run_with_hooks(batch, fwd_hooks=[(name, patch)])[:, -1, :8]
    assert torch.allclose(out, hand, atol=ATOL)


def test_das_fits_on_image_rows(setup):
    model, batch, _ = setup
    last = torch.full((4,), batch.shape[1] - 1)
    fit = analysis.fit_das(model, "blocks.1.hook_resid_pre", batch, batch[[1, 0, 3, 2]], torch.tensor([0, 1, 2, 3]),
                           _task(model), rank=1, epochs=2, batch_size=2, base_positions=last, source_positions=last)
    assert all(torch.isfinite(p).all() for p in fit.subspace.parameters())


def test_sparse_probe_on_vision_features(setup):
    model, _, _ = setup
    batch = toy_batch(model, 24, seed=3)
    _, cache = model.tower("vision").run_with_cache(batch, names_filter="blocks.1.hook_resid_post")
    features = cache["blocks.1.hook_resid_post"].mean(1)
    labels = torch.arange(24) % 2
    result = analysis.fit_sparse_probe(features, labels, k=4)
    assert result.selected_features.shape == (4,)
    assert set(result.train_indices.tolist()).isdisjoint(result.test_indices.tolist())


def test_projection_kernel_of_two_heads_is_the_trace_of_their_projectors(setup):
    model, _, _ = setup
    for tower in (model, model.tower("vision")):
        a = analysis.orthonormal_subspace(tower.W_V[0, 0].detach())
        b = analysis.orthonormal_subspace(tower.W_V[0, 1].detach())
        pk = analysis.projection_kernel(a, b)
        hand = torch.trace((a.basis @ a.basis.T) @ (b.basis @ b.basis.T))
        assert float(pk.score) == pytest.approx(float(hand), abs=1e-4)


def test_bridge_only_tools_refuse(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="TransformerBridge"):
        analysis.attention_head_subspace_affinity(model, target_role="Q")
    with pytest.raises(TypeError, match="TransformerBridge"):
        analysis.JacobianLens.fit(model, ["a red square"], corpus="toy")


def test_tools_never_run_without_the_image(setup):
    model, batch, answer = setup
    with pytest.raises(ValueError, match="no pixel_values"):
        analysis.logit_lens(model, batch.input_ids)
    with pytest.raises(ValueError, match="no pixel_values"):
        analysis.attribution_patch(model, batch.input_ids[0:1], batch.input_ids[1:2], lambda logits: logits[0, -1, answer])


def test_vlm_inputs_quack_like_token_rows(setup):
    model, batch, _ = setup
    full = model(batch)
    assert batch.ndim == 2 and len(batch) == 4 and batch[1].shape == batch.shape[1:]
    assert torch.allclose(model(batch[1])[0], full[1], atol=ATOL)
    assert torch.allclose(model(batch[torch.tensor([3, 0])]), full[[3, 0]], atol=ATOL)
    joined = torch.cat([batch[2:], batch[:2]])
    assert joined.row_images == (1, 1, 1, 1) and torch.allclose(model(joined), full[[2, 3, 0, 1]], atol=ATOL)
    assert torch.equal(batch[:, -1], batch.input_ids[:, -1])  # positions are plain token ids
    assert model(batch.to("cpu")).shape == full.shape


def test_tools_on_the_vision_tower_view():
    """Through ``model.tower("vision")``: node attribution over vision heads (toy-blip2's Q-Former reads the last
    vision layer, so every vision block reaches the output); the logit lens refuses a tower without an unembedding."""
    model = toy("tl-vlm/toy-blip2")
    batch = toy_batch(model, 2)
    vision = model.tower("vision")
    answer = int(model(batch[0:1])[0, -1].argmax())
    result = analysis.attribution_patch(vision, vision.inputs(batch[0:1]), vision.inputs(batch[1:2]),
                                        lambda logits: logits[0, -1, answer])
    layers = {node.layer for node in result.node_scores if node.kind == "attn_head_out"}
    assert layers == set(range(vision.cfg.n_layers))
    with pytest.raises(NotImplementedError, match="unembed"):
        analysis.logit_lens(vision, vision.inputs(batch))
