"""Where each part of a model lives: a device map over placement units, from a dict, a device count or budgets.

Units are the language tower's blocks (``blocks.{i}``) and every other top-level module with weights (``embed``,
``ln_final``, ``unembed``, ``vision``, ``projector``, ``qformer``, a T5 ``encoder`` / ``decoder``, ...). A plan
keeps the image path (vision tower, Q-Former, projector) and the embeddings on the first device, so image features
are merged where the text embeddings are; blocks are balanced by size; the final norm and unembedding go last,
except a tied unembedding, which stays with the embedding it shares weights with (as HF's loader does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

DeviceMap = dict[str, torch.device]
_FIRST = ("embed", "rotary", "pos_embed")  # the language stream starts here
_LAST = ("ln_final", "unembed")


def placement_units(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Unit name -> bytes of its parameters and buffers, in ``dtype`` if given (shapes only: works on a model whose
    weights are not loaded yet)."""
    units: dict[str, int] = {}
    for name, child in model.named_children():
        if name == "blocks":
            for i, block in enumerate(child):
                units[f"blocks.{i}"] = _bytes(block, dtype)
        elif _bytes(child, dtype) or name in _FIRST:
            units[name] = _bytes(child, dtype)
    return units


def _bytes(module: nn.Module, dtype: torch.dtype | None) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in tensors)


def unit_device(plan: DeviceMap) -> Callable[[str], torch.device]:
    """The device of the unit a parameter name belongs to (``blocks.3.attn.W_Q`` -> ``plan["blocks.3"]``)."""

    def device(name: str) -> torch.device:
        parts = name.split(".")
        unit = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        return plan[unit]

    return device


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"10GiB"``, ``"500MB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", size, re.IGNORECASE)
    if match is None:
        raise ValueError(f"memory budget {size!r}: expected bytes or a size such as '10GiB' or '500MB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(match.group(1)) * units[match.group(2).lower()])


def check_device(device: str | torch.device) -> torch.device:
    """A device that exists on this machine, or a clear error naming it."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} in the device map is not a torch device ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ValueError(f"the device map names {device} but this machine has {count} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def plan_placement(
    model: nn.Module,
    device_map: str | Mapping[str, str | torch.device] | None = None,
    n_devices: int | None = None,
    max_memory: Mapping[str, int | str] | None = None,
    dtype: torch.dtype | None = None,
) -> DeviceMap:
    """A full device map for ``model``: ``device_map`` as a dict (unit names or prefixes such as ``"blocks"`` ->
    device; every unit must be placed), ``"auto"`` (the GPUs' free memory, then CPU memory, or ``max_memory``),
    or ``n_devices`` GPUs split evenly by size."""
    units = placement_units(model, dtype)
    if isinstance(device_map, Mapping):
        return _from_dict(units, device_map)
    if n_devices is not None:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_devices > available:
            raise ValueError(f"n_devices={n_devices} but this machine has {available} CUDA device(s)")
        total = sum(units.values())
        budgets = {torch.device("cuda", i): -(-total // n_devices) for i in range(n_devices)}
        return _balanced(units, budgets, tied=_tied(model), strict=False)
    if device_map != "auto" and device_map is not None:
        raise ValueError(f"device_map={device_map!r}: expected 'auto', a dict of unit -> device, or n_devices=N")
    budgets = {check_device(d): parse_size(s) for d, s in (max_memory or _free_memory()).items()}
    return _balanced(units, budgets, tied=_tied(model), strict=True)


def _free_memory() -> dict[str, int]:
    budgets: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            budgets[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0] * 0.9)  # room for activations
    budgets["cpu"] = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9)
    return budgets


def _tied(model: nn.Module) -> bool:
    return bool(model.cfg.tie_word_embeddings) if "unembed" in dict(model.named_children()) else False


def _from_dict(units: dict[str, int], device_map: Mapping[str, str | torch.device]) -> DeviceMap:
    plan: DeviceMap = {}
    for key, device in device_map.items():  # "" places everything; later, more specific keys override
        matched = [u for u in units if key == "" or u == key or u.startswith(key + ".")]
        if not matched:
            raise ValueError(f"device map key {key!r} names no part of this model; its parts are: {', '.join(units)}")
        for unit in matched:
            plan[unit] = check_device(device)
    unplaced = [u for u in units if u not in plan]
    if unplaced:
        raise ValueError(
            f"the device map leaves {len(unplaced)} part(s) unplaced: {', '.join(unplaced[:8])}"
            f"{' ...' if len(unplaced) > 8 else ''}; give every part a device (prefixes such as 'blocks' place a group)"
        )
    return plan


def _balanced(units: dict[str, int], budgets: dict[torch.device, int], tied: bool, strict: bool) -> DeviceMap:
    """Fill devices in order: the image path and embeddings first, blocks in order, the final norm and (untied)
    unembedding last; a device takes units until its budget is spent. Not ``strict``: the last device takes the
    rest (an even split whose rounding leaves a few bytes over)."""
    first = [u for u in units if not u.startswith("blocks.") and u not in _LAST]
    blocks = [u for u in units if u.startswith("blocks.")]
    last = [u for u in _LAST if u in units and not (tied and u == "unembed")]
    order = first + (["unembed"] if tied and "unembed" in units else []) + blocks + last
    devices, plan, used, i = list(budgets), {}, 0, 0
    for n, unit in enumerate(order):
        size = units[unit]
        while used + size > budgets[devices[i]] and (strict or i < len(devices) - 1):
            i, used = i + 1, 0
            if i == len(devices):
                need = sum(units[u] for u in order[n:])
                raise ValueError(
                    f"the model does not fit: {unit} and the parts after it need {need / 2**20:.1f} MiB beyond the "
                    f"budgets ({', '.join(f'{d}: {b / 2**20:.1f} MiB' for d, b in budgets.items())}); raise max_memory, "
                    "add a device or load in a smaller dtype"
                )
        plan[unit] = devices[i]
        used += size
    return plan
