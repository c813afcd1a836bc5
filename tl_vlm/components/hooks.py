"""Skip a HookPoint's module call when nothing is attached: the forward pass stays as cheap as HF's."""

from __future__ import annotations

from torch import Tensor
from transformer_lens.hook_points import HookPoint


def active(hook: HookPoint) -> bool:
    return bool(hook._forward_hooks or hook._backward_hooks)


def run_hook(hook: HookPoint, x: Tensor) -> Tensor:
    return hook(x) if (hook._forward_hooks or hook._backward_hooks) else x
