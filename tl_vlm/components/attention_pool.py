"""SigLIP's multihead attention pooling head (MAP): one learned probe query cross-attends to every patch, then a
pre-norm MLP with a residual; the probe's output is the image's pooled feature.

HF runs it with ``nn.MultiheadAttention`` (fused ``in_proj``); here it is a ``CrossAttention`` with TL's per-head
hooks (``vision.head.attn.hook_pattern`` is ``[image, head, 1, patch]``: where the pooled feature looks).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.cross_attention import CrossAttention
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import make_norm
from tl_vlm.config import TowerConfig


class AttentionPool(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(cfg.d_model))
        self.attn = CrossAttention(cfg, cfg.n_layers, cfg.d_model)
        self.ln = make_norm("LN", cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, gated=False, bias=True)
        self.hook_attn_out = HookPoint()  # [image, 1, d_model]
        self.hook_mlp_out = HookPoint()

    def forward(self, x: Float[Tensor, "image patch d_model"]) -> Float[Tensor, "image d_model"]:
        probe = self.probe.expand(x.shape[0], 1, -1)
        attn_out = run_hook(self.hook_attn_out, self.attn(probe, x))
        mlp_out = run_hook(self.hook_mlp_out, self.mlp(self.ln(attn_out)))
        return (attn_out + mlp_out)[:, 0]
