"""Multimodal rotary position embedding (M-RoPE) of Qwen2-VL / Qwen2.5-VL language towers.

Every token has three position ids (temporal, height, width). The rotary frequencies are split into
``mrope_section`` consecutive sections; section ``i`` rotates by the position id of axis ``i % 3``.
Text tokens have three equal ids, so on text M-RoPE is the 1D rotary.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from tl_vlm.components.rotary import Rotary


class MultimodalRotary(Rotary):
    def __init__(self, inv_freq: Float[Tensor, " half"], mrope_section: list[int], attention_scaling: float = 1.0):
        super().__init__(inv_freq, attention_scaling)
        if sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"mrope_section {mrope_section} must sum to the {inv_freq.shape[0]} rotary frequencies")
        self.mrope_section = list(mrope_section)

    @classmethod
    def from_hf_config(cls, text_config) -> "MultimodalRotary":
        # HF's own initialiser: the same inverse frequencies (and rope scaling variants) as the reference.
        hf_rotary = Qwen2VLRotaryEmbedding(config=text_config)
        return cls(hf_rotary.inv_freq, hf_rotary.mrope_section, hf_rotary.attention_scaling)

    def forward(
        self, position_ids: Int[Tensor, "3 batch pos"] | Int[Tensor, "batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
        if position_ids.ndim == 2:  # text only: the same id on all three axes
            position_ids = position_ids.expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [3, batch, pos, half]
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


class InterleavedMultimodalRotary(MultimodalRotary):
    """Qwen3-VL's interleaved M-RoPE (HF: ``Qwen3VLTextRotaryEmbedding``): frequency ``j`` rotates by the height id
    when ``j % 3 == 1`` and ``j < 3 * mrope_section[1]``, by the width id when ``j % 3 == 2`` and
    ``j < 3 * mrope_section[2]``, else by the temporal id; every axis then spans low to high frequencies."""

    def __init__(self, inv_freq: Float[Tensor, " half"], mrope_section: list[int], attention_scaling: float = 1.0):
        super().__init__(inv_freq, mrope_section, attention_scaling)
        axis = torch.zeros(inv_freq.shape[0], dtype=torch.long)
        for dim in (1, 2):
            axis[dim : 3 * mrope_section[dim] : 3] = dim
        self.register_buffer("axis", axis, persistent=False)

    @classmethod
    def from_hf_config(cls, text_config) -> "InterleavedMultimodalRotary":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

        hf_rotary = Qwen3VLTextRotaryEmbedding(config=text_config)
        return cls(hf_rotary.inv_freq, hf_rotary.mrope_section, hf_rotary.attention_scaling)

    def forward(
        self, position_ids: Int[Tensor, "3 batch pos"] | Int[Tensor, "batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
        if position_ids.ndim == 2:
            position_ids = position_ids.expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [3, batch, pos, half]
        freqs = freqs.gather(0, self.axis.expand_as(freqs[:1]))[0]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
