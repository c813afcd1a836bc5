"""A decoder-only language tower with gated cross-attention layers at ``cross_layers`` (Mllama's text model).

Self-attention layers are the usual ``TransformerBlock``; the cross-attention layers are ``GatedCrossBlock``
(``blocks.{i}.cross_attn.*``, ``hook_cross_attn_out``, gates ``gate_attn`` / ``gate_ffn``, no self-attention).
Images never enter the token stream: ``hook_embed`` is the token embedding everywhere (the ``<|image|>`` token
has an embedding row of its own, one of the 8 rows past the output vocabulary), ``hook_image_embed`` is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.components import Embed, Rotary
from tl_vlm.components.cross_kv_cache import CrossAttentionKVCache
from tl_vlm.components.gated_cross_block import GatedCrossBlock, ImageKV
from tl_vlm.config import TowerConfig
from tl_vlm.towers.language import DecoderLM


@dataclass
class ImageContext:
    """What the cross-attention layers read: the projected vision features of each row (None at decode steps,
    whose keys / values are cached), the additive mask and the rows that may see some image."""

    features: Float[Tensor, "batch ctx d_model"] | None
    mask: Float[Tensor, "batch 1 pos ctx"]
    text_rows: Float[Tensor, "batch pos 1"]


class CrossAttentionLM(DecoderLM):
    resumable = False  # cross-attention blocks take the image keys and values, not the self-attention arguments
    def __init__(self, cfg: TowerConfig, rotary: Rotary, cross_layers: tuple[int, ...], n_embeddings: int):
        super().__init__(cfg, rotary)
        self.cross_layers = cross_layers
        self.embed = Embed(n_embeddings, cfg.d_model)
        for i in cross_layers:
            self.blocks[i] = GatedCrossBlock(cfg, i)

    def forward(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch total_pos"] | None = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: CrossAttentionKVCache | None = None,
        stop_at_layer: int | None = None,
        logits_to_keep: int = 0,
        images: ImageContext | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"]:
        """As ``DecoderLM.forward``; ``images`` None: no image (cross-attention layers pass the stream through) or,
        with a filled cache, the cached image keys / values with the mask the caller built."""
        batch, pos = embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + pos, device=embeds.device).expand(batch, -1)
        rotary = self.rotary(position_ids, embeds.dtype)
        mask, causal = self._mask(attention_mask, batch, pos, past, embeds)
        resid = embeds
        for i, block in enumerate(self.blocks[:stop_at_layer]):
            if i in self.cross_layers:
                store: ImageKV | None = cache.images[i] if cache is not None else None
                context = (images.features, images.mask, images.text_rows) if images is not None else (None, None, None)
                resid = block(resid, *context, store)
            else:
                resid = block(resid, rotary, mask, causal, cache[i] if cache is not None else None)
        if stop_at_layer is not None:
            return resid
        return self.unembed(self.ln_final(resid)[:, -logits_to_keep:])

