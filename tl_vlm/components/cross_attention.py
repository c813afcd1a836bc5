"""Cross-attention: queries from the residual stream, keys and values from another sequence.

Used where text or query tokens read another tower's output: the Q-Former reading image patches
(pattern ``[batch, head, query, patch]``) and encoder-decoder language models reading the encoder.
Same per-head hooks, parameter layout and SDPA / explicit paths as self-attention.
"""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components import param_layout as layout
from tl_vlm.components.attention import Attention
from tl_vlm.components.hooks import run_hook
from tl_vlm.config import TowerConfig


class CrossAttention(Attention):
    def __init__(self, cfg: TowerConfig, layer: int, d_context: int):
        super().__init__(cfg.replace(positional_embedding_type="none"), layer)
        # Keys and values read the context's width, which differs from d_model (Q-Former: the ViT's width).
        self._W_K = nn.Parameter(layout.empty_heads_in(cfg.n_key_value_heads, d_context, cfg.d_head))
        self._W_V = nn.Parameter(layout.empty_heads_in(cfg.n_key_value_heads, d_context, cfg.d_head))
        self.cfg = cfg  # the tower's own config object: set_use_attn_result toggles it

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        context: Float[Tensor, "batch ctx d_context"],
        mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``mask``: ``[batch, 1, pos, ctx]`` boolean (True = may attend) or additive float bias; None = all."""
        q = run_hook(self.hook_q, self._project(x, self.W_Q, self.b_Q))
        k = run_hook(self.hook_k, self._project(context, self._W_K, self._b_K))  # [batch, ctx, head, d_head]
        v = run_hook(self.hook_v, self._project(context, self._W_V, self._b_V))
        z = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal=False)
        return self._output(z)

