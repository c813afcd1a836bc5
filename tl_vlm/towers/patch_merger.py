"""Qwen's PatchMerger projector: norm each patch, concatenate each 2x2 merge block, then an MLP.

Hooks: ``projector.hook_in`` [image, patch, d_vision] (the vision tower's output), ``projector.ln.*``,
``projector.mlp.hook_pre|post`` and ``projector.hook_out`` [image, token, d_out] with one token per merge
block (``merge_size**2`` consecutive patches of the vision layout).
"""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import MLP, make_norm
from tl_vlm.components.hooks import run_hook


class PatchMerger(nn.Module):
    def __init__(self, d_vision: int, d_out: int, merge_size: int, normalization_type: str, eps: float = 1e-6):
        super().__init__()
        self.d_merged = d_vision * merge_size**2
        self.hook_in = HookPoint()
        self.ln = make_norm(normalization_type, d_vision, eps)
        # HF's nn.GELU() is the exact (erf) GELU, ACT2FN's "gelu".
        self.mlp = MLP(self.d_merged, self.d_merged, "gelu", gated=False, bias=True, d_out=d_out)
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "image patch d_vision"]) -> Float[Tensor, "image token d_out"]:
        x = self.ln(run_hook(self.hook_in, x))
        return run_hook(self.hook_out, self.mlp(x.reshape(x.shape[0], -1, self.d_merged)))
