"""LayerNorm and RMSNorm with TL's hook_scale / hook_normalized.

Without hooks they run the same fused kernels as HF. A hook that may edit ``hook_scale`` / ``hook_normalized``
switches to the explicit form, whose output uses the hooked values. Caching alone keeps the fused output in half
precision (HF's bit for bit; the statistics for the cache are computed beside it in float32); in float32 the
cache takes the fused kernel's own normalized values and statistics (RMSNorm: HF's output unchanged; LayerNorm:
within an ulp of it).
``elementwise=False`` is the folded (LNPre / RMSPre) form used after ``fold_ln``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.hooks import active, editing, run_hook


class LayerNorm(nn.Module):
    def __init__(self, d_model: int, eps: float, elementwise: bool = True):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.w = nn.Parameter(torch.ones(d_model)) if elementwise else None
        self.b = nn.Parameter(torch.zeros(d_model)) if elementwise else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if editing(self.hook_scale) or editing(self.hook_normalized):
            normalized = self._normalized(x)
            return (normalized if self.w is None else normalized * self.w.float() + self.b.float()).to(x.dtype)
        if not (active(self.hook_scale) or active(self.hook_normalized)):
            return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)
        if x.dtype != torch.float32:  # (the fused kernel's statistics would be rounded to the half dtype)
            self._normalized(x)  # for the cache
            return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)
        # For the cache, the fused kernel's normalized values and statistics, then the affine map (within an ulp of
        # F.layer_norm): three ops where recomputing the statistics takes eight, which counts in a forward of a few
        # milliseconds.
        normalized, _, rstd = torch.native_layer_norm(x, (self.d_model,), None, None, self.eps)
        run_hook(self.hook_scale, rstd.reciprocal())
        normalized = run_hook(self.hook_normalized, normalized)
        return normalized if self.w is None else torch.addcmul(self.b, normalized, self.w)

    def _normalized(self, x: Tensor) -> Float[Tensor, "... d_model"]:
        # In float32, as F.layer_norm accumulates (fp16 squares would overflow), rounded once by the caller.
        x = x.float()
        x = x - x.mean(-1, keepdim=True)
        scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return run_hook(self.hook_normalized, x / scale)


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float, elementwise: bool = True):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.w = nn.Parameter(torch.ones(d_model)) if elementwise else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        dtype = x.dtype
        x = x if dtype == torch.float32 else x.float()  # HF computes the statistic in fp32 whatever the model dtype
        if editing(self.hook_scale) or editing(self.hook_normalized):
            scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = run_hook(self.hook_normalized, x / scale)
        else:
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            x = x * rstd  # HF's output; the cache gets the same normalized values
            if active(self.hook_scale) or active(self.hook_normalized):
                run_hook(self.hook_scale, rstd.reciprocal())
                run_hook(self.hook_normalized, x)
        if self.w is not None and self.w.dtype == torch.float32 != dtype:
            # Gemma keeps its (1 + w) in float32 and multiplies before rounding, as HF's Gemma RMSNorm.
            return (self.w * x).to(dtype)
        # Back to the input dtype; to a half-precision weight's dtype when they differ (T5's float32 residual stream
        # after a float32 W_out, as HF's T5LayerNorm does).
        half = self.w is not None and self.w.dtype in (torch.float16, torch.bfloat16)
        target = self.w.dtype if half else dtype
        x = x if x.dtype == target else x.to(target)
        return x if self.w is None else self.w * x


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    if kind in ("LN", "LNPre"):
        return LayerNorm(d_model, eps, elementwise=kind == "LN")
    if kind in ("RMS", "RMSPre"):
        return RMSNorm(d_model, eps, elementwise=kind == "RMS")
    raise ValueError(f"unknown normalization_type {kind!r}; expected LN, LNPre, RMS or RMSPre")
