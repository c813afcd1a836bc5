"""Preallocated key/value cache for generation, one entry per language block."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


class KVCacheEntry:
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int, dtype: torch.dtype, device):
        self.k = torch.empty(batch, n_kv_heads, max_len, d_head, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(
        self, k: Float[Tensor, "batch kv pos d_head"], v: Float[Tensor, "batch kv pos d_head"]
    ) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; this step needs {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def check_context(cfg, needed: int) -> None:
    """Refuse generation longer than the language model's context before allocating a cache for it: HF's
    ``max_new_tokens=10**9`` would otherwise ask for terabytes at once."""
    if needed > cfg.n_ctx:
        raise ValueError(
            f"generation needs {needed} positions (prompt + max_new_tokens) but the language model's context is "
            f"{cfg.n_ctx} positions (n_ctx, from max_position_embeddings); lower max_new_tokens to at most "
            f"{cfg.n_ctx} minus the prompt length"
        )


class KVCache:
    """Past keys/values of every block plus the attention mask seen so far."""

    def __init__(self, cfg, batch: int, max_len: int, device, dtype: torch.dtype):
        """``device``: one device, or one per layer (a model placed over several devices)."""
        devices = device if isinstance(device, (list, tuple)) else [device] * cfg.n_layers
        self.entries = [KVCacheEntry(batch, cfg.n_key_value_heads, max_len, cfg.d_head, dtype, d) for d in devices]

    @property
    def length(self) -> int:
        return self.entries[0].length

    def __getitem__(self, layer: int) -> KVCacheEntry:
        return self.entries[layer]

    def select_rows(self, rows: Int[Tensor, " row"]) -> None:
        """Keep these batch rows, in this order (beam search: a row's prompt copied to each of its beams, then
        each beam continuing from its parent's keys and values)."""
        for entry in self.entries:
            rows = rows.to(entry.k.device)
            entry.k, entry.v = entry.k[rows], entry.v[rows]
