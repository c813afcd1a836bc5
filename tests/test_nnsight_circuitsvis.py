"""nnsight reads and edits hook-point and block outputs in every tower of a HookedVLM, and CircuitsVis shows
attention over image tokens named by their grid cell. Skipped where nnsight / circuitsvis are not installed."""

from __future__ import annotations

import pytest
import torch
from toy_batches import toy, toy_batch

from tl_vlm.analysis.attention_view import attention_patterns, token_labels
from tl_vlm.analysis.spatial import spatial_index


@pytest.fixture(scope="module")
def setup():
    model = toy()
    return model, toy_batch(model, 2)


def _zero(x, hook):
    return torch.zeros_like(x)


def test_nnsight_reads_and_edits_every_tower(setup):
    nnsight = pytest.importorskip("nnsight")
    model, batch = setup
    _, cache = model.run_with_cache(batch)
    traced = nnsight.NNsight(model)
    # nnsight asks in execution order: vision tower, projector, language tower.
    with traced.trace(batch):
        vision_post = traced.vision.blocks[1].hook_resid_post.output.save()
        vision_block = traced.vision.blocks[3].output.save()  # past the feature layer: runs because it is asked for
        projected = traced.projector.hook_out.output.save()
        language_block = traced.blocks[0].output.save()
        z = traced.blocks[1].attn.hook_z.output.save()
    assert torch.allclose(vision_post, cache["vision.blocks.1.hook_resid_post"], atol=1e-5)
    _, full = model.run_with_cache(batch, names_filter="vision.blocks.3.hook_resid_post")
    assert torch.allclose(vision_block, full["vision.blocks.3.hook_resid_post"], atol=1e-5)
    assert torch.allclose(projected, cache["projector.hook_out"], atol=1e-5)
    assert torch.allclose(language_block, cache["blocks.0.hook_resid_post"], atol=1e-5)
    assert torch.allclose(z, cache["blocks.1.attn.hook_z"], atol=1e-5)
    for name, module in [("vision.blocks.1.hook_mlp_out", lambda t: t.vision.blocks[1].hook_mlp_out),
                         ("blocks.0.hook_resid_post", lambda t: t.blocks[0])]:
        with traced.trace(batch):
            module(traced).output[:] = 0
            edited = traced.output.save()
        assert torch.allclose(edited, model.run_with_hooks(batch, fwd_hooks=[(name, _zero)]), atol=1e-5), name


def test_image_tokens_are_named_by_their_cell(setup):
    model, batch = setup
    labels = token_labels(model, batch, row=1)
    cells = spatial_index(model, batch)
    first = cells[cells.batch == 1].iloc[0]
    assert labels[first.position] == f"img{first.image} r{first.row}c{first.col}"
    assert len(labels) == batch.shape[1] and sum(label.startswith("img") for label in labels) == (cells.batch == 1).sum()


def test_circuitsvis_renders_an_image_prompt(setup):
    pytest.importorskip("circuitsvis")
    model, batch = setup
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.attn.hook_pattern")
    html = str(attention_patterns(model, batch, cache["blocks.1.attn.hook_pattern"][0]))
    assert "r0c0" in html
