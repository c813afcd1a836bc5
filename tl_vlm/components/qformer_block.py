"""BERT-style post-LN Q-Former block: self-attention, cross-attention to the image (some layers), and
separate feed-forward networks for the query tokens and the instruction text.

Residual hooks follow TransformerLens' ``BertBlock``: ``hook_resid_mid`` / ``hook_resid_post`` are
the sums *before* their LayerNorm, ``hook_normalized_resid_post`` is the block's output (HF's layer
output). Only the first ``n_query`` positions (the learned queries) cross-attend and use ``mlp`` /
``ln2``; instruction tokens (InstructBLIP) skip the cross-attention and use ``mlp_text`` / ``ln2_text``.
Cross-attention hooks therefore cover the query positions only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.attention import Attention
from tl_vlm.components.cross_attention import CrossAttention
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import LayerNorm
from tl_vlm.config import TowerConfig


class QFormerBlock(nn.Module):
    def __init__(self, cfg: TowerConfig, layer: int, d_image: int | None, text_mlp: bool):
        super().__init__()
        self.layer = layer
        d, eps = cfg.d_model, cfg.eps
        self.attn = Attention(cfg, layer)
        self.ln1 = LayerNorm(d, eps)
        self.cross_attn = CrossAttention(cfg, layer, d_image) if d_image is not None else None
        if self.cross_attn is not None:
            self.hook_cross_attn_out = HookPoint()  # [batch, query, d_model]
            self.hook_resid_mid_cross = HookPoint()
            self.ln_cross = LayerNorm(d, eps)
        self.mlp = MLP(d, cfg.d_mlp, cfg.act_fn, gated=False, bias=True)
        self.ln2 = LayerNorm(d, eps)
        self.mlp_text = MLP(d, cfg.d_mlp, cfg.act_fn, gated=False, bias=True) if text_mlp else None
        self.ln2_text = LayerNorm(d, eps) if text_mlp else None
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_normalized_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        image: Float[Tensor, "batch patch d_image"],
        n_query: int,
        mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = run_hook(self.hook_resid_pre, resid)
        attn_out = run_hook(self.hook_attn_out, self.attn(resid, mask=mask))
        x = self.ln1(run_hook(self.hook_resid_mid, resid + attn_out))
        queries, text = x[:, :n_query], x[:, n_query:]
        if self.cross_attn is not None:
            cross_out = run_hook(self.hook_cross_attn_out, self.cross_attn(queries, image))
            queries = self.ln_cross(run_hook(self.hook_resid_mid_cross, queries + cross_out))
        has_text = text.shape[1] > 0
        if has_text and self.mlp_text is None:
            raise ValueError("this Q-Former has no text feed-forward (BLIP-2: queries only); it takes no instruction")
        if has_text:
            x = torch.cat([queries, text], dim=1)
            mlp_out = torch.cat([self.mlp(queries), self.mlp_text(text)], dim=1)
        else:
            x, mlp_out = queries, self.mlp(queries)
        resid = run_hook(self.hook_resid_post, x + run_hook(self.hook_mlp_out, mlp_out))
        out = self.ln2(resid[:, :n_query])
        if has_text:
            out = torch.cat([out, self.ln2_text(resid[:, n_query:])], dim=1)
        return run_hook(self.hook_normalized_resid_post, out)
