"""SigLIP's multihead attention pooling head (MAP): one learned probe query cross-attends to every patch, then a
pre-norm MLP with a residual; the probe's output is the image's pooled feature.

HF runs it with ``nn.MultiheadAttention`` (fused ``in_proj``); here it is a ``CrossAttention`` with TL's per-head
hooks (``vision.head.attn.hook_pattern`` is ``[image, head, 1, patch]``: where the pooled feature looks), computed
with ``nn.MultiheadAttention``'s arithmetic (queries scaled before the product, softmax in the input dtype), so
half precision is HF's bit for bit. One query: the explicit path costs nothing next to the tower. SigLIP 2's padded
patches come as an additive mask (``nn.MultiheadAttention``'s float ``attn_mask``: added by ``baddbmm``, so the
masked scores hold the dtype's minimum).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import param_layout as layout
from tl_vlm.components.cross_attention import CrossAttention
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import make_norm
from tl_vlm.config import TowerConfig


class PoolAttention(CrossAttention):
    """Computed in ``nn.MultiheadAttention``'s layout (sequence first, one product for keys and values, heads folded
    into the batch of ``bmm``): in half precision any other layout rounds differently. Hooks see TL's shapes."""

    def forward(
        self, x: Float[Tensor, "image 1 d_model"], context: Float[Tensor, "image patch d_model"],
        mask: Float[Tensor, "image 1 patch"] | None = None,
    ) -> Float[Tensor, "image 1 d_model"]:
        n, h, dh = x.shape[0], self.cfg.n_heads, self.cfg.d_head
        w_kv = torch.cat([layout.heads_in_linear(self._W_K), layout.heads_in_linear(self._W_V)])
        b_kv = torch.cat([self._b_K.reshape(-1), self._b_V.reshape(-1)])
        q = F.linear(x.transpose(0, 1), layout.heads_in_linear(self.W_Q), self.b_Q.reshape(-1))  # [1, image, h*dh]
        kv = F.linear(context.transpose(0, 1), w_kv, b_kv).unflatten(-1, (2, h * dh)).movedim(-2, 0).contiguous()

        def heads(t: Tensor, hook) -> Tensor:  # [seq, image, h*dh] -> hooked [image, seq, h, dh] -> [image*h, seq, dh]
            hooked = run_hook(hook, t.transpose(0, 1).unflatten(-1, (h, dh)))
            return hooked.transpose(0, 1).reshape(t.shape[0], n * h, dh).transpose(0, 1)

        q, k, v = heads(q, self.hook_q), heads(kv[0], self.hook_k), heads(kv[1], self.hook_v)
        q = q * math.sqrt(1.0 / dh)
        if mask is None:
            scores = torch.bmm(q, k.transpose(-2, -1))
        else:  # one mask row per image, repeated per head (image-major, as the batch of bmm)
            scores = torch.baddbmm(mask.repeat_interleave(h, dim=0), q, k.transpose(-2, -1))
        scores = run_hook(self.hook_attn_scores, scores.view(n, h, *scores.shape[1:]))
        pattern = run_hook(self.hook_pattern, scores.softmax(-1))
        z = torch.bmm(pattern.reshape(n * h, *pattern.shape[2:]), v)  # [image*h, 1, dh]
        return self._output(run_hook(self.hook_z, z.view(n, h, -1, dh).transpose(1, 2)))


class AttentionPool(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(cfg.d_model))
        self.attn = PoolAttention(cfg, cfg.n_layers, cfg.d_model)
        self.ln = make_norm("LN", cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, gated=False, bias=True)
        self.hook_attn_out = HookPoint()  # [image, 1, d_model]
        self.hook_mlp_out = HookPoint()

    def forward(
        self, x: Float[Tensor, "image patch d_model"], mask: Float[Tensor, "image 1 patch"] | None = None
    ) -> Float[Tensor, "image d_model"]:
        """``mask``: additive, 0 at real patches and the dtype's minimum at padding (None: every patch is real)."""
        probe = self.probe.repeat(x.shape[0], 1, 1)  # materialised, as HF: a stride-0 input takes another kernel
        attn_out = run_hook(self.hook_attn_out, self.attn(probe, x, mask))
        mlp_out = run_hook(self.hook_mlp_out, self.mlp(self.ln(attn_out)))
        return (attn_out + mlp_out)[:, 0]
