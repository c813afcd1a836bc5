"""LayerNorm and RMSNorm with TL's hook_scale / hook_normalized.

Without hooks they run the same fused kernels as HF; with hooks the explicit form exposes the
scale. ``elementwise=False`` is the folded (LNPre / RMSPre) form used after ``fold_ln``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.hooks import active, run_hook


class LayerNorm(nn.Module):
    def __init__(self, d_model: int, eps: float, elementwise: bool = True):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.w = nn.Parameter(torch.ones(d_model)) if elementwise else None
        self.b = nn.Parameter(torch.zeros(d_model)) if elementwise else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if not (active(self.hook_scale) or active(self.hook_normalized)):
            return F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)
        dtype = x.dtype
        x = x.float()  # statistics in fp32, as F.layer_norm accumulates them; fp16 squares overflow
        x = x - x.mean(-1, keepdim=True)
        scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = run_hook(self.hook_normalized, x / scale).to(dtype)
        return x if self.w is None else x * self.w + self.b


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
        if active(self.hook_scale) or active(self.hook_normalized):
            scale = run_hook(self.hook_scale, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = run_hook(self.hook_normalized, x / scale)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
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
