"""Mllama's gated cross-attention block: a language-model layer whose only attention reads the image.

``ln1`` -> ``cross_attn`` (queries from the text, keys / values from the projected vision features, RMS-normed per
head after ``hook_q`` / ``hook_k`` as TL's QK-norm) -> ``* tanh(gate_attn)`` = ``hook_cross_attn_out``; then
``ln2`` -> ``mlp`` -> zeroed on text rows that may see no image (HF's full-text-row mask) -> ``* tanh(gate_ffn)``
= ``hook_mlp_out``. There is no self-attention, so the block has no ``attn`` / ``hook_attn_out``.

The image keys and values are computed once, at the prompt pass, and kept in ``ImageKV`` for the decode steps
(HF's cross-attention cache). Without an image (and none cached) the block passes the stream through unchanged,
as HF skips the layer: only ``hook_resid_pre`` / ``hook_resid_post`` fire.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ImageKV:
    """One cross-attention layer's image keys and values ``[batch, kv_head, image_pos, d_head]`` (after k_norm)."""

    k: Tensor | None = None
    v: Tensor | None = None


class ImageCrossAttention(CrossAttention):
    """Cross-attention with per-head QK-norm whose keys and values can come from an ``ImageKV`` store."""

    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg.replace(use_qk_norm=True), layer, cfg.d_model)
        self.cfg = cfg

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        context: Float[Tensor, "batch ctx d_model"] | None,
        mask: Tensor | None = None,
        store: ImageKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``context``: the projected image features, or None to read the keys / values ``store`` holds; a given
        context is written into ``store``. ``mask``: additive ``[batch, 1, pos, ctx]``."""
        q = self.q_norm(run_hook(self.hook_q, self._project(x, self.W_Q, self.b_Q)))
        if context is not None:
            k = run_hook(self.hook_k, self._project(context, self._W_K, self._b_K))  # [batch, ctx, head, d_head]
            v = run_hook(self.hook_v, self._project(context, self._W_V, self._b_V))
            k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
            if store is not None:
                store.k, store.v = k, v
        else:
            k, v = store.k, store.v
        return self._output(self._attend(q.transpose(1, 2), k, v, mask, causal=False))


class GatedCrossBlock(nn.Module):
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.cross_attn = ImageCrossAttention(cfg, layer)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, cfg.mlp_bias)
        self.gate_ffn = nn.Parameter(torch.zeros(1))
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_cross_attn_out = HookPoint()  # gated: what the cross-attention adds to the stream
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()  # gated and row-masked: what the MLP adds to the stream
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        context: Float[Tensor, "batch ctx d_model"] | None,
        mask: Float[Tensor, "batch 1 pos ctx"] | None,
        text_rows: Float[Tensor, "batch pos 1"] | None,
        store: ImageKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``text_rows``: 1 where a text position may see some image, 0 on rows HF's mask leaves empty (their MLP
        output is dropped)."""
        resid = run_hook(self.hook_resid_pre, resid)
        if context is None and (store is None or store.k is None):
            return run_hook(self.hook_resid_post, resid)
        cross = self.cross_attn(self.ln1(resid), context, mask, store)
        resid = run_hook(self.hook_resid_mid, resid + run_hook(self.hook_cross_attn_out, self.gate_attn.tanh() * cross))
        mlp = self.mlp(self.ln2(resid))
        if text_rows is not None:
            mlp = text_rows * mlp
        return run_hook(self.hook_resid_post, resid + run_hook(self.hook_mlp_out, self.gate_ffn.tanh() * mlp))
