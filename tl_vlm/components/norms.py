"""LayerNorm and RMSNorm with TL's hook_scale / hook_normalized.

Without hooks they run the same fused kernels as HF. A hook that may edit ``hook_scale`` / ``hook_normalized``
switches to the explicit form, whose output uses the hooked values; caching alone computes the explicit
statistics for the cache but keeps the fused output, so half-precision results stay HF's bit for bit.
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
        if active(self.hook_scale) or active(self.hook_normalized):
            self._normalized(x)  # for the cache
        return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)

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
        x = x.float()  # HF computes the statistic in fp32 whatever the model dtype
        if editing(self.hook_scale) or editing(self.hook_normalized):
            scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = run_hook(self.hook_normalized, x / scale)
        else:
            mean_square = x.pow(2).mean(-1, keepdim=True)
            if active(self.hook_scale) or active(self.hook_normalized):  # for the cache; the output stays HF's
                run_hook(self.hook_normalized, x / run_hook(self.hook_scale, (mean_square + self.eps).sqrt()))
            x = x * torch.rsqrt(mean_square + self.eps)
        if self.w is not None and self.w.dtype == torch.float32 != dtype:
            # Gemma keeps its (1 + w) in float32 and multiplies before rounding, as HF's Gemma RMSNorm.
            return (self.w * x).to(dtype)
        # Back to the input dtype; to a half-precision weight's dtype when they differ (T5's float32 residual stream
        # after a float32 W_out, as HF's T5LayerNorm does).
        half = self.w is not None and self.w.dtype in (torch.float16, torch.bfloat16)
        x = x.to(self.w.dtype if half else dtype)
        return x if self.w is None else self.w * x


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    if kind in ("LN", "LNPre"):
        return LayerNorm(d_model, eps, elementwise=kind == "LN")
    if kind in ("RMS", "RMSPre"):
        return RMSNorm(d_model, eps, elementwise=kind == "RMS")
    raise ValueError(f"unknown normalization_type {kind!r}; expected LN, LNPre, RMS or RMSPre")
