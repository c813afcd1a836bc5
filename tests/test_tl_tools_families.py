"""TransformerLens tools and the analyses on the BLIP-2 and Qwen-VL families (LLaVA: test_tl_tools.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import patching

from tl_vlm import HookedVLM
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_blip2 import build_tiny_blip2
from tl_vlm.zoo.tiny_qwen_vl import build_tiny_qwen_vl

BUILDERS = {"blip2_opt": build_tiny_blip2, "instructblip_vicuna": build_tiny_blip2, "qwen2_5_vl": build_tiny_qwen_vl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def experiment(request, tmp_path_factory):
    variant = request.param
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedVLM.from_pretrained(BUILDERS[variant](tmp_path_factory.mktemp(variant), variant))
    prompt = format_prompt(model.processor, "What colour is the shape?")
    sizes = [(40, 28)] if variant.startswith("qwen") else None
    clean, corrupt = (model.prepare(images=sample_images(1, seed=s, sizes=sizes), text=prompt) for s in (40, 41))
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    return variant, model, clean, corrupt, cache, (lambda out: out[0, -1, token])


def test_language_patching_matches_manual_loop(experiment):
    _, model, clean, corrupt, cache, metric = experiment
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
    image = model.image_token_mask(corrupt.input_ids)[0]
    for layer in range(model.cfg.n_layers):
        for pos in image.nonzero()[:3, 0].tolist() + [corrupt.shape[1] - 1]:
            name = f"blocks.{layer}.hook_resid_pre"

            def hook(act, hook, pos=pos, name=name):
                act[:, pos] = cache[name][:, pos]
                return act

            with torch.no_grad():
                expected = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
            assert torch.allclose(result[layer, pos], expected, atol=1e-6)


@pytest.mark.parametrize("tower", ["language", "vision"])
def test_tower_views_patch_and_decompose(experiment, tower):
    _, model, clean, corrupt, _, metric = experiment
    view = model.tower(tower)
    _, cache = view.run_with_cache(clean)
    n = view.cfg.n_layers
    for layer in range(n + 1):
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        assert (cache.decompose_resid(layer=layer).sum(0) - target).abs().max() <= 1e-5
    with torch.no_grad():
        heads = patching.get_act_patch_attn_head_out_all_pos(view, view.inputs(corrupt), cache, metric)
    assert heads.shape == (n, view.cfg.n_heads) and heads.abs().max() > 0


def test_qformer_view_and_query_index(experiment):
    variant, model, clean, corrupt, _, metric = experiment
    if not variant.startswith(("blip2", "instructblip")):
        pytest.skip("Q-Former towers only")
    qformer = model.tower("qformer")
    _, cache = qformer.run_with_cache(clean)
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(qformer, qformer.inputs(corrupt), cache, metric)
    assert result.shape[0] == qformer.cfg.n_layers
    index = spatial_index(model, clean)
    assert set(index["kind"]) == {"query"} and len(index) == model.qformer.n_query


def test_spatial_index_and_gradients(experiment):
    from tl_vlm.analysis.attribution import attribution_patch

    _, model, clean, corrupt, _, metric = experiment
    attr = attribution_patch(model, clean, corrupt, metric, lambda n: n == "blocks.0.hook_resid_pre")
    assert attr["blocks.0.hook_resid_pre"].shape == clean.input_ids.shape and attr["blocks.0.hook_resid_pre"].abs().max() > 0
