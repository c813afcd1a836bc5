"""Attention restricted to segments (images, frames, windows), run as HF's Qwen vision towers run it.

HF packs every image into one sequence and calls attention once per segment (``cu_seqlens``: per frame;
Qwen2.5-VL's windowed blocks: per window, in its window order). tl_vlm keeps one padded row per image, so the
same restriction is also a boolean mask; where nothing asks for the pattern, SDPA runs once per segment on
exactly HF's keys in HF's order, which makes half-precision results HF's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class Segments:
    parts: list[tuple[int, Int[Tensor, " n"]]]  # (row, patch indices of one segment, in HF's order)
    mask: Bool[Tensor, "batch 1 q k"] | None  # the same restriction as a mask (None: one segment per row)
    ordered: bool = False  # HF's order within each segment is the row's order (frames; not windows)

    def attend(
        self, q: Float[Tensor, "batch head pos d_head"], k: Tensor, v: Tensor, scale: float
    ) -> Float[Tensor, "batch head pos d_head"]:
        """SDPA per segment; positions in no segment (padding) get zeros."""
        if self.mask is None and self.ordered:  # each row is one segment in its own order: one call, the same sums
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        z = torch.zeros_like(q)
        for row, idx in self.parts:
            out = F.scaled_dot_product_attention(
                q[row][:, idx][None], k[row][:, idx][None], v[row][:, idx][None], scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            z[row][:, idx] = out[0]
        return z
