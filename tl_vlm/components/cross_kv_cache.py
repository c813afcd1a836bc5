"""KV cache of a language model with cross-attention layers (Mllama): self-attention keys / values per step, plus
each cross-attention layer's image keys / values, computed once at the prompt pass, and the prompt's last row of
the cross-attention mask, which every generated token reuses (as HF's generate repeats it)."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from tl_vlm.components.gated_cross_block import ImageKV
from tl_vlm.components.kv_cache import KVCache


class CrossAttentionKVCache(KVCache):
    def __init__(self, cfg, batch: int, max_len: int, device, dtype: torch.dtype, cross_layers: tuple[int, ...]):
        """``device``: one, or one per layer (a model placed over several devices)."""
        super().__init__(cfg, batch, max_len, device, dtype)
        self.images = {layer: ImageKV() for layer in cross_layers}
        self.last_mask_row: Int[Tensor, "batch image tile"] | None = None
        # Cross-attention layers never append to their self-attention entry: the length is a self-attention layer's.
        self._counted = next(i for i in range(cfg.n_layers) if i not in cross_layers)

    @property
    def length(self) -> int:
        return self.entries[self._counted].length

    def select_rows(self, rows: Int[Tensor, " row"]) -> None:
        super().select_rows(rows)
        for store in self.images.values():
            if store.k is not None:
                on = rows.to(store.k.device)
                store.k, store.v = store.k[on], store.v[on]
        if self.last_mask_row is not None:
            self.last_mask_row = self.last_mask_row[rows.to(self.last_mask_row.device)]
