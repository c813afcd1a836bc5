"""Skip a HookPoint's module call when nothing is attached: the forward pass stays as cheap as HF's.

``run_with_cache`` does not register a PyTorch hook per cached point: it gives each chosen HookPoint a
``cache_into`` dict and ``run_hook`` stores the (detached) activation there directly, which saves the
~12 us per point of registering, calling and removing TL's caching hooks. User hooks run first, so the
cache holds what flows on, as with TL's own caching hooks.
"""

from __future__ import annotations

from torch import Tensor
from transformer_lens.hook_points import HookPoint


def active(hook: HookPoint) -> bool:
    return bool(hook._forward_hooks or hook._backward_hooks) or hook.__dict__.get("cache_into") is not None


def editing(hook: HookPoint) -> bool:
    """Whether what is attached may change the activation (a forward hook); caching alone cannot."""
    return bool(hook._forward_hooks)


def run_hook(hook: HookPoint, x: Tensor) -> Tensor:
    if hook._forward_hooks or hook._backward_hooks:
        x = hook(x)
    store = hook.__dict__.get("cache_into")
    if store is not None:
        store[hook.name] = x.detach()
    return x
