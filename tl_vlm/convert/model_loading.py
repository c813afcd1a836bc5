"""The loading steps every hooked model shares (``HookedVLM`` and ``HookedCLIP``): a checkpoint's config, dtype,
safetensors and processor; an in-memory HF model's device and dtype; and, around ``rules.load_weights``, the
towers' dtype and device, the check that no weight is missing, the cast that keeps float32 weights float32; and,
after ``.to`` / ``.half()``, each tower's config following its weights. Each loader still reads top to bottom: it
calls these steps in order and adds only what its models need."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch import Tensor
from transformers import AutoConfig

from tl_vlm.checkpoints import resolve_checkpoint, safetensors_files
from tl_vlm.dtypes import resolve_dtype


def open_checkpoint(
    model_name: str | os.PathLike, revision: str | None, trust_remote_code: bool, dtype: torch.dtype | str
) -> tuple[Path, object, torch.dtype]:
    """The checkpoint's local directory, its HF config and the dtype to load in ("auto": the config's)."""
    path = resolve_checkpoint(model_name, revision)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return path, hf_config, resolve_dtype(dtype, config_dtype(hf_config))


def in_memory_target(
    hf_model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | str | None
) -> tuple[str | torch.device, torch.dtype, bool]:
    """Device, dtype and ``keep_float32`` for converting an in-memory HF model: its device unless ``device`` is
    given; without ``dtype`` (or "auto") the dtype it was loaded or cast in, each float32 weight kept float32."""
    device = device or next(hf_model.parameters()).device
    return device, resolve_dtype(dtype or "auto", loaded_dtype(hf_model)), dtype in (None, "auto")


def set_tower_placement(cfg, device: str | torch.device | None, dtype: torch.dtype) -> None:
    """Every tower config of ``cfg`` (``cfg.towers()``) records the dtype and device its weights load in."""
    for tower in cfg.towers():
        tower.dtype, tower.device = dtype, str(device) if device is not None else "cpu"


def sync_tower_placement(towers: Iterable[nn.Module]) -> None:
    """After ``.to`` / ``.half()``: each tower's ``cfg.dtype`` / ``cfg.device`` are its weights' (the dtype of most
    of them: a float16 BLIP-2 keeps its Q-Former, its first parameters, in float32)."""
    for tower in towers:
        counts: Counter = Counter()
        for p in tower.parameters():
            if p.is_floating_point():
                counts[p.dtype] += p.numel()
        tower.cfg.dtype = counts.most_common(1)[0][0]
        tower.cfg.device = str(next(tower.parameters()).device)


def check_complete(model: nn.Module, loaded: set[str]) -> None:
    """Every parameter was loaded (``load_weights``' names): a missing one would stay uninitialised memory."""
    missing = {name for name, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} weights the config requires (fewer layers or parts than its config "
            f"says?): {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}"
        )


def cast_keeping_float32(model: nn.Module, dtype: torch.dtype, device: str | torch.device | None) -> nn.Module:
    """``model.to(device=, dtype=)`` (device None: where each weight is) except for the weights loaded in float32
    on purpose (HF's float32 modules, an in-memory model's float32 weights): ``.to(dtype)`` must not round them."""
    kept = {name: p.data for name, p in model.named_parameters() if p.dtype == torch.float32 != dtype}
    model = model.to(device=device, dtype=dtype)
    for name, p in model.named_parameters():
        if name in kept:
            p.data = kept[name]
    return model


def config_dtype(hf_config) -> torch.dtype | None:
    """The dtype a checkpoint's config records (``dtype``; ``torch_dtype`` in older configs)."""
    dtype = hf_config.dtype if hf_config.dtype is not None else getattr(hf_config, "torch_dtype", None)
    return resolve_dtype(dtype, None) if dtype is not None else None


def loaded_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a model was loaded or cast in: that of most of its non-float32 weights, since HF keeps some
    modules in float32 (BLIP-2's Q-Former, its first parameters, which in a small model can be most of them)."""
    counts = Counter(p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32)
    return counts.most_common(1)[0][0] if counts else torch.float32


def optional_processor(family, path: Path, trust_remote_code: bool):
    """``family.load_processor``, or None with a warning when the checkpoint has no usable processor."""
    try:
        return family.load_processor(path, trust_remote_code)
    except (OSError, ValueError, ImportError) as err:  # ImportError: e.g. a video processor needing torchvision
        warnings.warn(f"no usable processor in {path} ({err}); model.prepare is unavailable, pass token ids and pixel_values")
        return None


def iter_safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                # Old files store rotary frequencies; HF's loader recomputes them (non-persistent buffers), so do we.
                if not key.endswith("inv_freq"):
                    yield key, handle.get_tensor(key)
