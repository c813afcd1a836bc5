"""Skip a HookPoint's module call when nothing is attached: the forward pass stays as cheap as HF's.

A hook slot (``blocks.0.hook_resid_pre``) is called as a PyTorch module whenever anything could observe or
change the call: a PyTorch hook on it (TL's ``add_hook``, ``register_forward_hook``, nnsight), a patched
``forward``, or another module swapped in for the HookPoint (SAELens' ``add_sae`` puts an SAE there). Only an
idle, plain HookPoint is skipped, so tools that work the PyTorch way see exactly what they would on TL.

``run_with_cache`` does not register a PyTorch hook per cached point: it gives each chosen HookPoint a
``cache_into`` dict and ``run_hook`` stores the (detached) activation there directly, which saves the
~12 us per point of registering, calling and removing TL's caching hooks. User hooks run first, so the
cache holds what flows on, as with TL's own caching hooks. HookPoints inside a swapped-in module are called by
that module, not by ``run_hook``; ``nested`` names them, and they are cached with TL's hooks.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from transformer_lens.hook_points import HookPoint


def has_torch_hooks(module: nn.Module) -> bool:
    """Anything PyTorch would run around this module's call (hooks of either direction, a patched forward)."""
    return _hooked(module.__dict__)


def _hooked(attributes: dict) -> bool:
    # Read from the instance dict (where nn.Module keeps its hook dicts): run_hook asks this of every hook slot of
    # every run, and a Module attribute lookup walks the class hierarchy first.
    return bool(
        attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"]
        or attributes["_backward_pre_hooks"] or "forward" in attributes
    )


def editing(hook: nn.Module) -> bool:
    """Whether what is attached may change the activation (a forward hook or pre-hook, a patched forward, a
    module swapped in); caching alone cannot."""
    if type(hook) is not HookPoint:
        return True
    attributes = hook.__dict__
    return bool(attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or "forward" in attributes)


def must_call(hook: nn.Module) -> bool:
    """The slot holds something other than an idle, plain HookPoint."""
    return type(hook) is not HookPoint or _hooked(hook.__dict__)


def cached(hook: nn.Module) -> bool:
    """Whether ``run_hook`` will store the slot's value (it is kept after the run)."""
    return hook.__dict__.get("cache_into") is not None


def active(hook: nn.Module) -> bool:
    """Whether the slot's value is observed or changed (so a lazily computed activation must be computed)."""
    attributes = hook.__dict__
    return type(hook) is not HookPoint or attributes.get("cache_into") is not None or _hooked(attributes)


def observed(module: nn.Module) -> bool:
    """Whether any hook slot in ``module`` is active or any of its modules has PyTorch hooks (a tower skips
    blocks that cannot change its output only when nothing would notice). A walk over the children: no names are
    built, as ``named_modules`` would, on a check that runs every forward."""
    if _hooked(module.__dict__):
        return True
    for name, child in module._modules.items():
        # A hook slot is active when it is cached or hooked, or holds a module swapped in (whose insides are its own).
        if child is not None and (active(child) if name.startswith("hook_") else observed(child)):
            return True
    return False


def run_hook(hook: nn.Module, x: Tensor) -> Tensor:
    attributes = hook.__dict__
    # _hooked, inlined: this runs at every hook slot of every run.
    if type(hook) is not HookPoint or (
        attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"]
        or attributes["_backward_pre_hooks"] or "forward" in attributes
    ):
        x = hook(x)
    store = attributes.get("cache_into")
    if store is not None:
        store[hook.name] = x.detach() if x.requires_grad else x  # already detached: no alias op per point
    return x


def nested(name: str) -> bool:
    """A hook name below another hook slot (``blocks.0.hook_resid_pre.hook_sae_acts_post``): it lives inside a
    module swapped in for a HookPoint, which calls it itself."""
    return "hook_" in name.rpartition(".")[0]
