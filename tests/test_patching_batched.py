"""tl_vlm.patching against TransformerLens' own patching loop: the same tensors on the same inputs (language
tower with and without the first-position shortcut, padded batches, M-RoPE with grouped K/V, BLIP-2's prepended
queries, tower views), batches that split when memory runs out, and the error when one cell does not fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS
from transformer_lens import patching as tl_patching
from transformer_lens.patching import layer_head_pattern_patch_setter, layer_pos_patch_setter

from tl_vlm import patching
from tl_vlm.patching.prefix import PrefixRun
from tl_vlm.zoo.data import sample_images

ATOL = 1e-5  # batched matmuls of other shapes round differently; measured max diff ~5e-7 on values ~2


def _pair(model, prompts, seeds=(5, 6)):
    clean, corrupt = (model.prepare(images=sample_images(len(prompts), seed=s), text=list(prompts)) for s in seeds)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    return corrupt, cache, lambda out: (out[:, -1, token] - out[:, -1].mean()).mean()


def _noisy(batch):
    """The same prompts with other pixels (placeholders and grids unchanged)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.pixel_values.shape, generator=generator).to(batch.pixel_values)
    return dataclasses.replace(batch, pixel_values=batch.pixel_values + noise)


def _same(ours, theirs):
    assert ours.shape == theirs.shape and theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def one_prompt(llava15):
    return llava15.model, *_pair(llava15.model, PROMPTS[:1])


@pytest.mark.parametrize("name", [
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_all_pos_every", "get_act_patch_block_every",
])
def test_language_tower_equals_tl(one_prompt, name):
    model, corrupt, cache, metric = one_prompt
    theirs = getattr(tl_patching, name)(model, corrupt, cache, metric)
    _same(getattr(patching, name)(model, corrupt, cache, metric), theirs)


def test_shortcut_applies_where_exact(one_prompt):
    model, corrupt, cache, metric = one_prompt
    assert PrefixRun.build(model, corrupt, layer_pos_patch_setter, "resid_pre") is not None
    assert not PrefixRun.build(model, corrupt, layer_head_pattern_patch_setter, "pattern").per_position
    assert PrefixRun.build(model, corrupt, layer_pos_patch_setter, "resid_pre").per_position
    assert PrefixRun.build(model.tower("vision"), corrupt, layer_pos_patch_setter, "resid_pre") is None  # bidirectional
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        assert PrefixRun.build(model, corrupt, layer_pos_patch_setter, "resid_pre") is None  # a hook would see a suffix
    full = patching.get_act_patch_attn_out(model, corrupt, cache, metric, reuse_prefix=False)
    _same(patching.get_act_patch_attn_out(model, corrupt, cache, metric), full)


def test_padded_batch_and_uneven_chunks(llava15):
    model = llava15.model
    corrupt, cache, metric = _pair(model, PROMPTS)
    assert not bool(corrupt.attention_mask.all())  # left padding: the shortcut slices the prompt's own mask
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_v_by_pos"):
        theirs = getattr(tl_patching, name)(model, corrupt, cache, metric)
        _same(getattr(patching, name)(model, corrupt, cache, metric, batch_size=7), theirs)


def test_vision_tower_view_equals_tl(one_prompt):
    model, corrupt, _, metric = one_prompt
    vision = model.tower("vision")
    clean = model.prepare(images=sample_images(1, seed=5), text=PROMPTS[0])
    with torch.no_grad():
        _, cache = vision.run_with_cache(clean)
    corrupt_v = vision.inputs(corrupt)
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
        theirs = getattr(tl_patching, name)(vision, corrupt_v, cache, metric)
        _same(getattr(patching, name)(vision, corrupt_v, cache, metric, batch_size=5), theirs)


@pytest.mark.parametrize("name", ["qwen2_vl", "blip2_opt", "qwen3_vl", "gemma3"])
def test_other_families_equal_tl(loaded, name):
    """M-RoPE positions with grouped K/V heads (the shortcut reuses the prompt's 3D rotary tables), BLIP-2's
    legacy prepended queries (language positions are not token positions: no shortcut), Qwen3-VL, whose
    DeepStack reads vision blocks' outputs (a patch must not edit the tensor it kept), and Gemma 3, whose tower
    is not resumable (local and global rotary tables: no shortcut)."""
    model, clean = loaded(name).model, loaded(name).batch()
    corrupt = _noisy(clean)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    metric = lambda out: out[:, -1, token].sum()  # noqa: E731
    theirs = tl_patching.get_act_patch_attn_head_k_all_pos(model, corrupt, cache, metric)
    _same(patching.get_act_patch_attn_head_k_all_pos(model, corrupt, cache, metric), theirs)
    theirs = tl_patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
    _same(patching.get_act_patch_resid_pre(model, corrupt, cache, metric, batch_size=16), theirs)
    vision = model.tower("vision")
    with torch.no_grad():
        _, vcache = vision.run_with_cache(clean)
    theirs = tl_patching.get_act_patch_resid_mid(vision, vision.inputs(corrupt), vcache, metric)
    _same(patching.get_act_patch_resid_mid(vision, vision.inputs(corrupt), vcache, metric), theirs)


def test_generic_with_index_df(one_prompt):
    model, corrupt, cache, metric = one_prompt
    cells = pd.DataFrame({"layer": [1, 0, 1], "pos": [3, 10, 30]})
    kwargs = dict(patch_setter=layer_pos_patch_setter, activation_name="mlp_out", index_df=cells, return_index_df=True)
    theirs, theirs_df = tl_patching.generic_activation_patch(model, corrupt, cache, metric, **kwargs)
    ours, ours_df = patching.generic_activation_patch(model, corrupt, cache, metric, **kwargs)
    _same(ours, theirs)
    pd.testing.assert_frame_equal(ours_df, theirs_df)
    default_df = tl_patching.generic_activation_patch(
        model, corrupt, cache, metric, layer_pos_patch_setter, "resid_pre", ("layer", "pos"), return_index_df=True)[1]
    ours_df = patching.generic_activation_patch(
        model, corrupt, cache, metric, layer_pos_patch_setter, "resid_pre", ("layer", "pos"), return_index_df=True)[1]
    pd.testing.assert_frame_equal(ours_df, default_df)


class _Budget:
    """A forward pre-hook that fails like an out-of-memory allocation when the batch exceeds ``rows``."""

    def __init__(self, rows: int):
        self.rows, self.seen = rows, []

    def __call__(self, module, args):
        self.seen.append(args[0].shape[0])
        if args[0].shape[0] > self.rows:
            raise torch.OutOfMemoryError(f"simulated: {args[0].shape[0]} rows")


def test_batches_split_when_memory_runs_out(one_prompt):
    model, corrupt, cache, metric = one_prompt
    budget = _Budget(rows=3)
    handle = model.blocks[0].register_forward_pre_hook(budget)
    try:
        with pytest.warns(UserWarning, match="batch_size=8"):
            ours = patching.get_act_patch_resid_pre(model, corrupt, cache, metric, batch_size=16)
    finally:
        handle.remove()
    assert budget.seen[:4] == [16, 8, 4, 2] and max(budget.seen[4:]) == 2
    _same(ours, tl_patching.get_act_patch_resid_pre(model, corrupt, cache, metric))


def test_error_when_one_cell_does_not_fit(one_prompt):
    model, corrupt, cache, metric = one_prompt
    handle = model.blocks[0].register_forward_pre_hook(_Budget(rows=0))
    try:
        with pytest.raises(patching.CellDoesNotFit, match="batch_size=1"), pytest.warns(UserWarning):
            patching.get_act_patch_resid_pre(model, corrupt, cache, metric, batch_size=2)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        patching.get_act_patch_resid_pre(model, corrupt, cache, metric, batch_size=0)


def test_metric_must_be_scalar(one_prompt):
    model, corrupt, cache, _ = one_prompt
    with pytest.raises(ValueError, match="scalar"):
        patching.get_act_patch_resid_pre(model, corrupt, cache, lambda out: out[0, -1, :2], batch_size=4)


def test_logits_to_keep_skips_the_unembedding_of_unread_positions(one_prompt):
    model, corrupt, cache, metric = one_prompt  # the metric reads the last position only
    theirs = tl_patching.get_act_patch_mlp_out(model, corrupt, cache, metric)
    _same(patching.get_act_patch_mlp_out(model, corrupt, cache, metric, logits_to_keep=1, batch_size=9), theirs)
    vision = model.tower("vision")
    clean = model.prepare(images=sample_images(1, seed=5), text=PROMPTS[0])
    with torch.no_grad():
        _, vcache = vision.run_with_cache(clean)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(vision, vision.inputs(corrupt), vcache, metric)
    _same(patching.get_act_patch_attn_head_out_all_pos(vision, vision.inputs(corrupt), vcache, metric, logits_to_keep=2), theirs)
    with pytest.raises(ValueError, match="outside the last 1 positions"):
        patching.get_act_patch_mlp_out(model, corrupt, cache, lambda out: out[0, -2, 0], logits_to_keep=1)


def test_lazy_logits_unembed_only_what_the_metric_reads(one_prompt, monkeypatch):
    """Under the shortcut, a metric indexing one position unembeds that position only, and any metric (indexing
    several positions, reductions over all logits, numpy) gets TL's values."""
    model, corrupt, cache, metric = one_prompt
    unembedded, unembed = [], PrefixRun.unembed

    def counted(self, resid):  # a PyTorch hook on the model would switch the shortcut off
        unembedded.append(resid.shape[1])
        return unembed(self, resid)

    monkeypatch.setattr(PrefixRun, "unembed", counted)
    ours = patching.get_act_patch_resid_pre(model, corrupt, cache, metric, batch_size=7)
    _same(ours, tl_patching.get_act_patch_resid_pre(model, corrupt, cache, metric))
    assert unembedded and set(unembedded) == {1}  # one position per read, never the suffix

    def spread(out):  # slices, Ellipsis, tensor positions, a full-logits reduction and a numpy round trip
        lse = torch.as_tensor(out.log_softmax(-1).detach().numpy()).mean()
        return out[..., 2:9:3, :].mean() + out[0, torch.tensor(-3)].std() + out[:, -1][:, 5].sum() + lse

    theirs = tl_patching.get_act_patch_attn_out(model, corrupt, cache, spread)
    _same(patching.get_act_patch_attn_out(model, corrupt, cache, spread, batch_size=5), theirs)

    def edits(out):  # writes in place and through an indexed view, then reads: the writes must hold
        out[:, :, 3] = -1e4
        row = out[:, -1]
        row -= row.mean(-1, keepdim=True)
        return out[:, -1].log_softmax(-1)[:, 3].mean() + out[:, -1, 5].mean()

    theirs = tl_patching.get_act_patch_resid_pre(model, corrupt, cache, edits)
    _same(patching.get_act_patch_resid_pre(model, corrupt, cache, edits, batch_size=6), theirs)


def test_lazy_logits_match_a_plain_tensor_under_any_index():
    """Random indexes on LazyLogits against the same indexes on the materialised tensor."""
    from tl_vlm.patching.lazy_logits import LazyLogits

    generator = torch.Generator().manual_seed(0)
    prefix, resid = torch.randn(2, 9, 11, generator=generator), torch.randn(2, 5, 4, generator=generator)
    w = torch.randn(4, 11, generator=generator)
    for keep in (0, 3, 7):
        lazy = LazyLogits(prefix, resid, 4, keep, lambda x: x @ w)
        plain = torch.cat([prefix[:, :4], resid @ w], dim=1)
        if keep:
            plain[:, : 9 - keep] = float("nan")
        mask = torch.rand(2, 9, generator=generator) > 0.5
        indexes = [(0, -1, 3), (slice(None), 5), (Ellipsis, 2, slice(None)), (1, slice(1, 8, 2)), (slice(None), slice(6, None)),
                   (0,), (slice(None), torch.tensor(8)), (slice(None), torch.tensor([1, 7])), (Ellipsis, 0), (1, -9, None),
                   (torch.tensor(True), 0, -1), (mask, 4), (mask, Ellipsis), (Ellipsis, -1, torch.tensor(True)),
                   (slice(None, None, 2), [3, -1]), (np.int64(1), np.array(2)), (slice(None), slice(2, 7, 2), [0, 10])]
        for index in indexes:
            lazy = LazyLogits(prefix, resid, 4, keep, lambda x: x @ w)  # fresh: what one read fills must not help the next
            torch.testing.assert_close(lazy[index], plain[index], equal_nan=True, atol=0, rtol=0)
        assert lazy.shape == plain.shape and len(lazy) == 2 and lazy.ndim == 3
        torch.testing.assert_close(lazy.softmax(-1), plain.softmax(-1), equal_nan=True)
        with pytest.raises(IndexError):
            lazy[0, 9]


def test_language_towers_declare_whether_runs_resume_at_a_block():
    from tl_vlm.towers.language import DecoderLM

    with pytest.raises(TypeError, match="must declare `resumable`"):
        type("Undeclared", (DecoderLM,), {})
