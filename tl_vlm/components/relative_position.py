"""T5's bucketed relative position bias: one learned scalar per (bucket, head), added to attention scores.

The bucketing is HF's own function (``T5Attention._relative_position_bucket``), so buckets are HF's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformers.models.t5.modeling_t5 import T5Attention


class RelativePositionBias(nn.Module):
    def __init__(self, n_buckets: int, n_heads: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.W_rel = nn.Parameter(torch.empty(n_buckets, n_heads))

    def forward(self, q_len: int, k_len: int, past: int = 0) -> Float[Tensor, "1 head q k"]:
        """Bias of queries at positions ``past .. past + q_len`` for keys at ``0 .. k_len``."""
        device = self.W_rel.device
        relative = torch.arange(k_len, device=device)[None, :] - torch.arange(past, past + q_len, device=device)[:, None]
        buckets = T5Attention._relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.n_buckets, max_distance=self.max_distance
        )
        return F.embedding(buckets, self.W_rel).permute(2, 0, 1)[None]
