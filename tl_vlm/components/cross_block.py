"""Pre-norm decoder block with cross-attention (T5's decoder), TransformerLens' T5 names:
``ln1`` / ``attn`` (self), ``ln2`` / ``cross_attn`` (reads the encoder output), ``ln3`` / ``mlp``."""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.attention import Attention
from tl_vlm.components.cross_attention import CrossAttention
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import make_norm
from tl_vlm.config import TowerConfig


class CrossAttentionBlock(nn.Module):
    def __init__(self, cfg: TowerConfig, layer: int, d_context: int):
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.cross_attn = CrossAttention(cfg, layer, d_context)
        self.ln3 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, cfg.mlp_bias)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_cross_attn_out = HookPoint()
        self.hook_resid_mid_cross = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        context: Float[Tensor, "batch ctx d_context"],
        mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCacheEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = run_hook(self.hook_resid_pre, resid)
        attn_out = run_hook(self.hook_attn_out, self.attn(self.ln1(resid), mask=mask, cache=cache))
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        cross_out = run_hook(self.hook_cross_attn_out, self.cross_attn(self.ln2(resid), context, context_mask))
        resid = run_hook(self.hook_resid_mid_cross, resid + cross_out)
        mlp_out = run_hook(self.hook_mlp_out, self.mlp(self.ln3(resid)))
        return run_hook(self.hook_resid_post, resid + mlp_out)
