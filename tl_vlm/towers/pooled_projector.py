"""Gemma 3's multi-modal projector: average-pool the patch grid to ``mm_tokens_per_image`` tokens, Gemma RMSNorm,
one linear map (no bias), each step as HF runs it (same layout into ``avg_pool2d``, same dtypes) so half precision
stays HF's bit for bit."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import RMSNorm
from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import run_hook


class PooledProjector(nn.Module):
    def __init__(self, d_in: int, d_out: int, grid: int, tokens_per_side: int, eps: float):
        super().__init__()
        self.grid, self.kernel = grid, grid // tokens_per_side
        self.hook_in = HookPoint()  # [image, patch, d_in]
        self.hook_pooled = HookPoint()  # [image, token, d_in]
        self.ln = RMSNorm(d_in, eps)  # Gemma's (1 + w), kept in float32
        self.W = nn.Parameter(layout.empty_in_out(d_in, d_out))
        self.hook_out = HookPoint()  # [image, token, d_out]

    def forward(self, x: Float[Tensor, "image patch d_in"]) -> Float[Tensor, "image token d_out"]:
        x = run_hook(self.hook_in, x)
        images, _, d = x.shape
        grid = x.transpose(1, 2).reshape(images, d, self.grid, self.grid).contiguous()
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        pooled = run_hook(self.hook_pooled, pooled)
        return run_hook(self.hook_out, torch.matmul(self.ln(pooled), self.W).to(x.dtype))
