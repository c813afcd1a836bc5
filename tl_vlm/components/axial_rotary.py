"""2D (axial) rotary position embedding of Qwen's vision towers.

A patch at (row, col) rotates the first half of each head's frequency pairs by its row and the second half
by its column (HF: ``Qwen2VLVisionRotaryEmbedding``); the rotation spans the whole head dimension. As in HF,
the rotation is computed in float32 whatever the model's dtype: cos / sin stay float32, which makes
``apply_rotary`` upcast q and k and cast the result back.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.components.rotary import Rotary


class AxialRotary(Rotary):
    @classmethod
    def from_hf_config(cls, vision_config, d_head: int) -> "AxialRotary":
        rope = vision_config.rope_parameters
        if rope.get("rope_type", "axial") != "axial":
            raise NotImplementedError(f"vision rope_type {rope['rope_type']!r} is not supported; Qwen uses 'axial'")
        quarter = d_head // 2  # each axis gets d_head / 4 frequencies, i.e. a rotary of width d_head / 2
        return cls(1.0 / (rope["rope_theta"] ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter)))

    def forward(
        self, position_ids: Int[Tensor, "image patch 2"]
    ) -> tuple[Float[Tensor, "image patch 1 d_head"], Float[Tensor, "image patch 1 d_head"]]:
        freqs = (position_ids[..., None].float() * self.inv_freq.float()).flatten(-2)  # [row freqs, col freqs]
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
