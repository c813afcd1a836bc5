"""Hook points and blocks behave as PyTorch modules do: a module swapped in for a HookPoint runs, PyTorch hooks on
any hook point or block fire (every block is called through ``__call__``), and ``run_with_cache`` sees the hook
points inside a swapped-in module."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from toy_batches import toy, toy_batch
from transformer_lens.hook_points import HookPoint


class Scale(nn.Module):
    """Stands in for an SAE: a module with HookPoints of its own, put where a HookPoint was."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
        self.hook_inner = HookPoint()

    def forward(self, x):
        return self.hook_inner(x * self.factor)


@pytest.fixture(scope="module")
def model_and_batch():
    model = toy()
    return model, toy_batch(model)


def _scaled(factor: float):
    return lambda x, hook: x * factor


# vision.blocks.3 is past the feature layer LLaVA reads (-2): it runs only because something is attached.
SLOTS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "vision.blocks.1.hook_mlp_out", "vision.blocks.0.ln1.hook_normalized",
         "projector.hook_out", "hook_embed"]


@pytest.mark.parametrize("name", SLOTS)
def test_a_module_swapped_in_for_a_hook_point_runs(model_and_batch, name):
    model, batch = model_and_batch
    expected = model.run_with_hooks(batch, fwd_hooks=[(name, _scaled(0.5))])
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    original = getattr(owner, attr)
    setattr(owner, attr, Scale(0.5))
    model.setup()
    try:
        logits, cache = model.run_with_cache(batch)
        assert torch.allclose(logits, expected, atol=1e-5)
        assert f"{name}.hook_inner" in cache  # the swapped module's own hook point is cached
    finally:
        setattr(owner, attr, original)
        model.setup()
    assert not torch.allclose(model(batch), expected, atol=1e-3)


@pytest.mark.parametrize("name", SLOTS)
def test_torch_forward_hooks_on_hook_points_fire(model_and_batch, name):
    model, batch = model_and_batch
    expected = model.run_with_hooks(batch, fwd_hooks=[(name, _scaled(0.5))])
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: out * 0.5)
    try:
        assert torch.allclose(model(batch), expected, atol=1e-5)
    finally:
        handle.remove()


def test_torch_hooks_on_every_block_of_every_tower_fire(model_and_batch):
    model, batch = model_and_batch
    for tower in model.towers().values():
        for i, block in enumerate(tower.blocks):
            calls = []
            handles = [block.register_forward_pre_hook(lambda module, args: calls.append("pre")),
                       block.register_forward_hook(lambda module, args, out: calls.append(out.shape))]
            try:
                model(batch)
            finally:
                for handle in handles:
                    handle.remove()
            assert calls[0] == "pre" and len(calls) == 2, (tower.cfg.original_architecture, i, calls)


def test_a_block_forward_hook_edits_the_output(model_and_batch):
    model, batch = model_and_batch
    expected = model.run_with_hooks(batch, fwd_hooks=[("vision.blocks.1.hook_resid_post", _scaled(0.0))])
    handle = model.vision.blocks[1].register_forward_hook(lambda module, args, out: out * 0.0)
    try:
        assert torch.allclose(model(batch), expected, atol=1e-5)
    finally:
        handle.remove()


def test_torch_backward_hooks_on_hook_points_fire(model_and_batch):
    model, batch = model_and_batch
    grads = []
    handle = model.vision.blocks[0].hook_resid_post.register_full_backward_hook(
        lambda module, grad_in, grad_out: grads.append(grad_out[0])
    )
    try:
        model(batch, return_type="loss").backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert len(grads) == 1 and grads[0].shape[0] == batch.pixel_values.shape[0] and grads[0].abs().sum() > 0
