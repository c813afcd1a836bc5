"""Pre-norm block whose attention and MLP outputs are scaled per channel before the residual add (layer scale:
InternViT's ``lambda_1`` / ``lambda_2``, timm's ``ls1`` / ``ls2``).

``hook_attn_out`` / ``hook_mlp_out`` hold the scaled outputs, what is added to the stream, so the residual
decomposes exactly; per-head ``hook_result`` is before the scale (``ls_attn * sum(result) + ...``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.attention import AttentionMask
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.config import TowerConfig


class LayerScaleBlock(TransformerBlock):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        self.ls_attn = nn.Parameter(torch.ones(cfg.d_model))
        self.ls_mlp = nn.Parameter(torch.ones(cfg.d_model))

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
        resid_pre_hooked: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not resid_pre_hooked:
            resid = run_hook(self.hook_resid_pre, resid)
        attn_out = run_hook(self.hook_attn_out, self.ls_attn * self.attn(self.ln1(resid), rotary, mask, causal, cache))
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        mlp_out = run_hook(self.hook_mlp_out, self.ls_mlp * self.mlp(self.ln2(resid)))
        return run_hook(self.hook_resid_post, resid + mlp_out)
