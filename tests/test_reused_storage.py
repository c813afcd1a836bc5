"""Cached activations (the explicit attention path's scores / pattern, the MLP's pre-activations and gated
product, the block's residual sums) are written into memory reused from run to run (components/reused_storage.py):
the same numbers as fresh memory, and a cache (or any view of it) that someone still holds is never written into."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import PROMPTS

from tl_vlm.components.attention import Attention
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.mlp import MLP
from tl_vlm.components.reused_storage import ReusedStorage
from tl_vlm.zoo.data import sample_images

ATTENTION = ("hook_attn_scores", "hook_pattern")
REUSING = (Attention, MLP, TransformerBlock)  # the modules with a ReusedStorage
SHAPE = (2, 3, 4)


def test_memory_is_handed_out_again_only_when_nothing_refers_to_it():
    pool, like = ReusedStorage(min_bytes=0), torch.zeros(1)
    first = pool.empty("scores", SHAPE, like)
    view = first[1]
    del first
    second = pool.empty("scores", SHAPE, like)  # a view of the first still lives: other memory
    assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    kept_ptr = view.untyped_storage().data_ptr()
    del view
    third = pool.empty("scores", SHAPE, like)
    assert third.data_ptr() == kept_ptr and third.shape == SHAPE and third.is_contiguous()
    storage = second.untyped_storage()  # a storage object refers to the memory as much as a tensor does
    storage_ptr = storage.data_ptr()
    del second
    assert pool.empty("scores", SHAPE, like).data_ptr() != storage.data_ptr()
    assert len(pool.slots[threading.get_ident(), "scores"]) == 2
    del storage
    assert pool.empty("scores", SHAPE, like).data_ptr() == storage_ptr


def test_threads_never_share_memory():
    """Two threads running a model at once must not both take the storage the other just found free."""
    pool, like = ReusedStorage(min_bytes=0), torch.zeros(1)
    freed = pool.empty("scores", SHAPE, like).data_ptr()  # dropped at once: free for this thread
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(pool.empty("scores", SHAPE, like).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != freed
    assert pool.empty("scores", SHAPE, like).data_ptr() == freed


def test_no_reuse_where_autograd_records_off_the_cpu_or_small():
    pool = ReusedStorage(min_bytes=0)
    leaf = torch.zeros(3, requires_grad=True)
    assert pool.empty("scores", SHAPE, leaf) is None
    with torch.no_grad():
        assert pool.empty("scores", SHAPE, leaf) is not None
    assert pool.empty("scores", SHAPE, torch.zeros(3, device="meta")) is None
    assert ReusedStorage().empty("scores", SHAPE, torch.zeros(1)) is None  # small: malloc's heap serves it
    assert ReusedStorage().empty("scores", (32, 1024), torch.zeros(1)) is not None


def _without_reuse(model) -> None:
    """The same model with every attention allocating as before (the reference numbers)."""
    for module in (m for m in model.modules() if isinstance(m, REUSING)):
        module.reused.empty = lambda *args: None


@pytest.fixture
def llava(llava15):
    """The tiny fixture, reusing memory of any size (its activations are below the default minimum)."""
    modules = [m for m in llava15.model.modules() if isinstance(m, REUSING)]
    for module in modules:
        module.reused = ReusedStorage(min_bytes=0)
    yield llava15.model
    for module in modules:
        module.reused = ReusedStorage()


def test_a_kept_cache_is_never_overwritten_and_a_dropped_one_is_reused(llava):
    a = llava.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])
    b = llava.prepare(images=sample_images(1, seed=4), text=PROMPTS[0])
    name = "blocks.0.attn.hook_pattern"
    with torch.no_grad():
        _, first = llava.run_with_cache(a)
        kept = {n: t.clone() for n, t in first.items() if n.endswith(ATTENTION)}
        view = first[name][0, :2]  # a view kept past its cache
        _, second = llava.run_with_cache(b)  # the first cache is alive: other memory
        assert second[name].data_ptr() != first[name].data_ptr()
        second_ptr = second[name].data_ptr()
        for n, t in kept.items():
            assert torch.equal(first[n], t), n
        ptr = first[name].data_ptr()
        del first
        _, third = llava.run_with_cache(a)  # only a view of the first is alive: still not reused
        assert third[name].data_ptr() != ptr
        assert torch.equal(view, kept[name][0, :2])
        del view, second
        _, fourth = llava.run_with_cache(b)
    assert fourth[name].data_ptr() == second_ptr  # the second cache is gone: its memory serves again
    assert torch.equal(third[name], kept[name])


@pytest.mark.parametrize("padded", [False, True], ids=["one prompt", "batch with padding"])
def test_same_numbers_as_fresh_memory(llava, padded):
    if padded:  # a boolean mask: the pattern of a query that sees nothing is zeroed in place
        inputs = llava.prepare(images=sample_images(2, seed=1), text=PROMPTS[:2])
        assert inputs.attention_mask is not None and not bool(inputs.attention_mask.all())
    else:
        inputs = llava.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])
    names = ["blocks.1.attn.hook_attn_scores", "vision.blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_pre",
             "blocks.1.mlp.hook_pre_linear", "blocks.1.mlp.hook_post", "vision.blocks.1.mlp.hook_pre",
             "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
    with torch.no_grad():
        _, previous = llava.run_with_cache(inputs)
        ptrs = [previous[name].data_ptr() for name in names]
        del previous
        out, cache = llava.run_with_cache(inputs)  # into the previous run's memory, values and all
        assert [cache[name].data_ptr() for name in names] == ptrs
        assert cache["blocks.1.hook_resid_pre"].data_ptr() == cache["blocks.0.hook_resid_post"].data_ptr()
        _without_reuse(llava)
        ref_out, ref = llava.run_with_cache(inputs)
    assert torch.equal(out, ref_out)
    assert list(cache.cache_dict) == list(ref.cache_dict)
    for name, tensor in ref.items():
        assert torch.equal(cache[name], tensor), name


def test_gradients_flow_through_the_explicit_path(llava):
    inputs = llava.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])
    grads = {}

    def keep_grad(pattern, hook):
        pattern.register_hook(lambda g: grads.setdefault(hook.name, g))

    llava.zero_grad()
    logits = llava.run_with_hooks(inputs, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), keep_grad)])
    logits[0, -1].sum().backward()
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    llava.zero_grad(set_to_none=True)


def test_release_lets_go_of_the_kept_memory(llava):
    inputs = llava.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])
    name = "blocks.0.mlp.hook_pre"
    with torch.no_grad():
        _, cache = llava.run_with_cache(inputs)
        ptr = cache[name].data_ptr()
        llava.release_reused_memory()
        assert all(not m.reused.slots for m in llava.modules() if isinstance(m, REUSING))
        kept = cache[name].clone()
        _, again = llava.run_with_cache(inputs)
    assert cache[name].data_ptr() == ptr and torch.equal(cache[name], kept)  # the cache still owns its memory
    assert torch.equal(again[name], kept)
