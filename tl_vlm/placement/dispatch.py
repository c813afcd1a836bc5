"""Run a model whose parts live on several devices: activations move at unit boundaries.

Each placement unit gets a forward pre-hook that moves the tensors it is called with to its device (as
accelerate's AlignDevicesHook does); the model's forward returns its output on the embedding's device (TL's
run_with_hooks calls ``forward`` directly, so a hook on the model itself would be skipped). Hook points inside a unit see activations on that unit's device, so hooks, caches, patching and
gradients are unchanged; a cache holds each activation on the device it was computed on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tl_vlm.placement.plan import DeviceMap


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside tuples / lists / dicts moved to ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def dispatch(model: nn.Module, plan: DeviceMap) -> dict[str, torch.utils.hooks.RemovableHandle]:
    """Move every unit of ``model`` to its planned device and align activations at the boundaries; returns the
    hooks by unit."""
    handles = {}
    for name, device in plan.items():
        unit = model.get_submodule(name)
        unit.to(device)

        def align(module, args, kwargs, device=device):
            return to_device(args, device), to_device(kwargs, device)

        handles[name] = unit.register_forward_pre_hook(align, with_kwargs=True)
    return handles
