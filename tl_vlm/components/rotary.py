"""1D rotary position embedding (Llama / Mistral / Qwen2 language towers).

The inverse frequencies come from transformers' own RoPE initialisers (default, linear, llama3,
yarn, ...), so every scaling variant matches HF without being re-derived here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


class Rotary(nn.Module):
    def __init__(self, inv_freq: Float[Tensor, " half"], attention_scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    @classmethod
    def from_hf_config(cls, text_config) -> "Rotary":
        rope = getattr(text_config, "rope_parameters", None) or {"rope_type": "default"}
        if rope.get("rope_type", "default") in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope_type {rope['rope_type']!r} changes with sequence length; not supported yet")
        hf_rotary = LlamaRotaryEmbedding(config=text_config)
        return cls(hf_rotary.inv_freq, hf_rotary.attention_scaling)

    def _apply(self, fn, recurse=True):
        # Model-wide dtype casts must not round the frequencies (HF keeps them in fp32 too).
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(
        self, position_ids: Int[Tensor, "batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """In cos / sin's precision: float32 tables rotate half-precision q / k in float32 (HF's Qwen vision towers)."""
    if cos.dtype != x.dtype:
        return (x.to(cos.dtype) * cos + rotate_half(x.to(cos.dtype)) * sin).to(x.dtype)
    return x * cos + rotate_half(x) * sin
