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
    # TL's analysis tools read the stream through ln_final -> unembed only from blocks that say their
    # hook_resid_post is the whole residual stream (not a stack the model combines later).
    hook_out_is_single_residual_stream = True

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
        resid_pre_hooked: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``resid_pre_hooked``: the tower already ran ``hook_resid_pre`` (it keeps the hooked stream as a hidden
        state); the block is still called as a module, so PyTorch hooks on it fire."""
        if not resid_pre_hooked:
            resid = run_hook(self.hook_resid_pre, resid)
        attn_out = run_hook(self.hook_attn_out, self.attn(self.ln1(resid), rotary, mask, causal, cache))
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        mlp_out = run_hook(self.hook_mlp_out, self.mlp(self.ln2(resid)))
        return run_hook(self.hook_resid_post, resid + mlp_out)
