"""Pre-norm transformer block with TL's residual-stream hooks."""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.attention import Attention, AttentionMask
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import make_norm
from tl_vlm.config import TowerConfig


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, cfg.mlp_bias)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.from_resid_pre(run_hook(self.hook_resid_pre, resid), rotary, mask, causal, cache)

    def from_resid_pre(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The block after its ``hook_resid_pre`` (for towers that read the hooked input themselves)."""
        attn_out = run_hook(self.hook_attn_out, self.attn(self.ln1(resid), rotary, mask, causal, cache))
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        mlp_out = run_hook(self.hook_mlp_out, self.mlp(self.ln2(resid)))
        return run_hook(self.hook_resid_post, resid + mlp_out)

    def hook_points(self) -> list[HookPoint]:
        return [m for m in self.modules() if isinstance(m, HookPoint)]
