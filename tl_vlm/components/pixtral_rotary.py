"""2D rotary position embedding of Pixtral's vision tower.

A patch at (row, col) rotates each head's first quarter of frequency pairs by its row and the second quarter by
its column, with the even-indexed frequencies of a ``d_head`` rotary for rows and the odd-indexed ones for
columns (HF: ``PixtralVisionRotaryEmbedding``, whose ``inv_freq`` buffer is already laid out [rows | cols]); the
rotation spans the whole head dimension. Unlike Qwen's, the tables are cast to the model's dtype before the
rotation, as HF does, so half-precision q / k are rotated in half precision.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

from tl_vlm.components.rotary import Rotary


class PixtralRotary(Rotary):
    @classmethod
    def from_hf_config(cls, vision_config) -> "PixtralRotary":
        rope = vision_config.rope_parameters
        if rope.get("rope_type", "axial") != "axial":
            raise NotImplementedError(f"Pixtral vision rope_type {rope['rope_type']!r} is not supported; HF's is 'axial'")
        inv_freq, scaling = PixtralVisionRotaryEmbedding.compute_axial_rope_parameters(vision_config)
        return cls(inv_freq, scaling)

    def forward(
        self, position_ids: Int[Tensor, "image patch 2"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "image patch 1 d_head"], Float[Tensor, "image patch 1 d_head"]]:
        quarter = self.inv_freq.shape[0] // 2
        inv_freq = self.inv_freq.float()
        rows = position_ids[..., :1].float() * inv_freq[:quarter]
        cols = position_ids[..., 1:].float() * inv_freq[quarter:]
        half = torch.cat((rows, cols), dim=-1)
        emb = torch.cat((half, half), dim=-1)[..., None, :]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
