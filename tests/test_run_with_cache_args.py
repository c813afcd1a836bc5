"""``run_with_cache(names_filter=, device=, pos_slice=, remove_batch_dim=)`` on tl_vlm's direct caching path equals
TransformerLens' per-hook caching (HookedRootModule.run_with_cache) on the same model and inputs: the same names,
shapes and values within float rounding (TL slices positions on axis -3 for q/k/v/z/result, -2 otherwise)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS
from transformer_lens import HookedRootModule
from transformer_lens.utilities import Slice

from tl_vlm import CacheArena
from tl_vlm.cache_store import SlicedCache
from tl_vlm.zoo.data import sample_images

CASES = [
    dict(pos_slice=-1),
    dict(pos_slice=(2, 9)),
    dict(pos_slice=[0, 2, 3], names_filter=lambda n: n.endswith(("hook_z", "hook_pattern", "hook_scale", "hook_rot_q"))),
    dict(device="cpu", names_filter=["blocks.0.hook_resid_pre", "vision.blocks.1.attn.hook_k"]),
    dict(device="cpu", pos_slice=Slice(-3), remove_batch_dim=True),
    dict(pos_slice=-2, names_filter="blocks.1.hook_mlp_out", remove_batch_dim=True),
]


@pytest.fixture(scope="module")
def inputs(llava15):
    return llava15.model.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])


@pytest.mark.parametrize("args", CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items() if k != "names_filter"))
def test_equals_tl_per_hook_caching(llava15, inputs, args):
    model = llava15.model
    with torch.no_grad():
        out, ours = model.run_with_cache(inputs, **args)
        tl_args = dict(args)
        if "names_filter" not in tl_args:  # HookedVLM's default leaves out hook_result, as HookedTransformer
            tl_args["names_filter"] = lambda n: not n.endswith("hook_result")
        tl_out, theirs = HookedRootModule.run_with_cache(model, inputs, **tl_args)
    # TL's per-hook caching and the direct path (plain run_with_cache too) round the forward differently by ~1e-6;
    # names and shapes agree exactly.
    torch.testing.assert_close(out, tl_out, atol=1e-5, rtol=1e-5)
    assert list(ours.cache_dict) == list(theirs) and theirs
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    assert ours.has_batch_dim == (not args.get("remove_batch_dim", False))


def test_a_slice_does_not_keep_the_activation_alive():
    store = SlicedCache(pos_slice=-1)
    store["blocks.0.hook_resid_pre"] = torch.randn(2, 50, 8)
    kept = store.finish()["blocks.0.hook_resid_pre"]
    assert kept.shape == (2, 1, 8) and kept.untyped_storage().nbytes() == 2 * 8 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned non-blocking copies need a CUDA device")
def test_gpu_to_cpu_copies_are_pinned_and_complete():
    store = SlicedCache(device="cpu", pos_slice=(0, 3))
    x = torch.randn(1, 7, 4, 16, device="cuda")
    store["blocks.0.attn.hook_z"] = x
    kept = store.finish()["blocks.0.attn.hook_z"]
    assert kept.is_pinned() and torch.equal(kept, x[:, :3].cpu())


def test_arena_reuses_storage_only_when_asked(llava15, inputs):
    model = llava15.model
    arena = CacheArena()
    other = model.prepare(images=sample_images(1, seed=4), text=PROMPTS[0])
    with torch.no_grad():
        _, plain = model.run_with_cache(inputs)
        _, first = model.run_with_cache(inputs, arena=arena)
        kept = {name: t.clone() for name, t in first.items()}
        _, second = model.run_with_cache(other, arena=arena)
        _, other_plain = model.run_with_cache(other)
    assert list(first.cache_dict) == list(plain.cache_dict)
    for name, tensor in plain.items():
        assert torch.equal(kept[name], tensor), name
        assert torch.equal(second[name], other_plain[name]), name
        # Documented: the arena's buffers are reused, so the first cache now shows the second run.
        assert second[name].data_ptr() == first[name].data_ptr()
    assert not torch.equal(first["blocks.0.hook_resid_pre"], kept["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="arena"):
        model.run_with_cache(inputs, arena=arena, incl_bwd=True)


def test_arena_reallocates_for_a_new_shape(llava15, inputs):
    model = llava15.model
    arena = CacheArena()
    longer = model.prepare(images=sample_images(1, seed=3), text=PROMPTS[1])
    with torch.no_grad():
        _, a = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre", arena=arena)
        _, b = model.run_with_cache(longer, names_filter="blocks.0.hook_resid_pre", arena=arena)
        _, plain = model.run_with_cache(longer, names_filter="blocks.0.hook_resid_pre")
    assert a["blocks.0.hook_resid_pre"].shape != b["blocks.0.hook_resid_pre"].shape
    assert torch.equal(b["blocks.0.hook_resid_pre"], plain["blocks.0.hook_resid_pre"])
