"""Dtypes by name, as users and HF's loader spell them, and "auto": the checkpoint's own dtype."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` as a torch dtype; "auto" is the checkpoint's (float32 when it does not say, as HF's loader)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return checkpoint_dtype or torch.float32
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype, 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[name]
