"""Gemma decoder language tower (Gemma, Gemma 2, Gemma 3 text) under HookedTransformer's names.

What differs from ``DecoderLM``: token embeddings times sqrt(d_model) (``hook_embed`` holds the scaled stream,
image features are not scaled, as in HF); Gemma 2 / 3 blocks with norms before and after each sublayer
(``GemmaBlock``); per-layer "global" / "local" attention (``cfg.attn_types``), local layers limited to a sliding
window and, in Gemma 3, rotated with their own RoPE base (``rotary_local``); Gemma 2's tanh cap on the logits.

Families pass ``blocks`` (one id per position, -1 for none): positions with the same id see each other in both
directions (Gemma 3: the tokens of one image; PaliGemma: image + prompt prefix). How a sliding window composes with
them follows HF's per-family masks: Gemma 3 windows the blocks too (``window_limits_blocks``), PaliGemma 2 does not.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import KVCache, Rotary, TransformerBlock, Unembed, make_norm
from tl_vlm.components.embeddings import ScaledEmbed, soft_cap
from tl_vlm.components.gemma_block import GemmaBlock
from tl_vlm.config import TowerConfig
from tl_vlm.towers.language import DecoderLM, causal_mask


class GemmaLM(DecoderLM):
    resumable = False  # local and global layers get different rotary tables
    def __init__(self, cfg: TowerConfig, rotary: Rotary, rotary_local: Rotary | None, window_limits_blocks: bool):
        # DecoderLM's embedding merge and weight views are shared; its modules and forward are not.
        nn.Module.__init__(self)
        self.cfg, self.window_limits_blocks = cfg, window_limits_blocks
        self.embed = ScaledEmbed(cfg.d_vocab, cfg.d_model, cfg.d_model**0.5)
        self.hook_text_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_image_embed = HookPoint()
        self.hook_embed = HookPoint()
        self.rotary = rotary
        self.rotary_local = rotary_local  # Gemma 3's local layers; None: every layer uses ``rotary``
        block = GemmaBlock if cfg.use_normalization_before_and_after else TransformerBlock
        self.blocks = nn.ModuleList([block(cfg, i) for i in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)

    def forward(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch total_pos"] | None = None,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        cache: KVCache | None = None,
        stop_at_layer: int | None = None,
        logits_to_keep: int = 0,
        blocks: Int[Tensor, "batch total_pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"]:
        """As ``DecoderLM.forward``; ``blocks``: bidirectional groups over the whole sequence (prompt passes only)."""
        batch, pos = embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + pos, device=embeds.device).expand(batch, -1)
        kinds = self.cfg.attn_types or ["global"] * self.cfg.n_layers
        rotaries = {"global": self.rotary(position_ids, embeds.dtype)}
        if "local" in kinds:
            rotaries["local"] = rotaries["global"] if self.rotary_local is None else self.rotary_local(position_ids, embeds.dtype)
        masks = {
            kind: self._gemma_mask(attention_mask, pos, past, embeds, self.cfg.sliding_window if kind == "local" else None, blocks)
            for kind in set(kinds)
        }
        resid = embeds
        for i, block in enumerate(self.blocks[:stop_at_layer]):
            resid = block(resid, rotaries[kinds[i]], *masks[kinds[i]], cache[i] if cache is not None else None)
        if stop_at_layer is not None:
            return resid
        return soft_cap(self.unembed(self.ln_final(resid)[:, -logits_to_keep:]), self.cfg.output_logits_soft_cap)

    def _gemma_mask(
        self, attention_mask: Tensor | None, pos: int, past: int, like: Tensor, window: int | None, blocks: Tensor | None
    ) -> tuple[Bool[Tensor, "batch 1 q k"] | None, bool]:
        """Boolean mask (True = may attend), or (None, causal) where SDPA's own causal masking is exact. With
        ``blocks`` the mask is always explicit, as HF builds it (so the same SDPA kernel runs)."""
        if blocks is None:
            return causal_mask(attention_mask, pos, past, like, window)
        total = past + pos
        q = torch.arange(past, total, device=like.device)[:, None]
        k = torch.arange(total, device=like.device)[None, :]
        allowed = (k <= q)[None, None]
        ids = blocks.to(like.device)
        same = (ids[:, past:, None] == ids[:, None, :total]) & (ids[:, past:, None] >= 0)
        allowed = allowed | same[:, None]
        if window is not None:
            in_window = (q - k < window)[None, None]
            # Gemma 3: window(causal | block); PaliGemma 2: window(causal) | block
            allowed = allowed & in_window if self.window_limits_blocks else ((k <= q)[None, None] & in_window) | same[:, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        return allowed, False
