"""QK-norm over the whole projection width (InternViT-6B's ``q_norm`` / ``k_norm``): one RMSNorm over all heads'
queries (keys) together, before they are split into heads. The per-head QK-norm of Qwen3 / Gemma 3
(``TowerConfig.use_qk_norm``) normalises each head's ``d_head`` on its own.

It takes and returns the attention's ``[batch, pos, head, d_head]``; ``hook_scale`` is [batch, pos, 1] and
``hook_normalized`` [batch, pos, head * d_head].
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.norms import RMSNorm


class WidthRMSNorm(RMSNorm):
    def forward(self, x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        return super().forward(x.flatten(-2)).view(x.shape)
