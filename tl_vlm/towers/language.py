"""Decoder-only language tower (Llama, Vicuna, Mistral, Qwen2 with rotary positions; OPT with learned
positions, ``hook_pos_embed``) under HookedTransformer's names.

``hook_embed`` holds the merged input embedding: token embeddings at text positions and projected
image features at image positions. ``hook_text_embed`` and ``hook_image_embed`` split it (each is
zero where the other is not), so ``hook_embed == text + image`` exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import Embed, KVCache, PosEmbed, Rotary, TransformerBlock, Unembed, make_norm
from tl_vlm.components.hooks import active, run_hook
from tl_vlm.config import TowerConfig
from tl_vlm.towers.stacked import LanguageWeights, StackedWeights


class MergedEmbeds:
    """``embed_inputs`` for language towers with ``embed`` and ``hook_text_embed|image_embed|embed``: token
    embeddings with the image features written at the image positions."""

    def embed_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"],
        image_features: Float[Tensor, "n_image_tokens d_model"] | None = None,
        image_mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if image_features is None:
            text = self.embed(input_ids)
            if active(self.hook_text_embed):
                text = run_hook(self.hook_text_embed, text)
            if active(self.hook_image_embed):
                text = text + run_hook(self.hook_image_embed, torch.zeros_like(text))
            return run_hook(self.hook_embed, text)
        mask = image_mask[..., None]
        text = self.embed(input_ids.masked_fill(image_mask, 0))
        features = image_features.to(text.dtype)
        if active(self.hook_text_embed) or active(self.hook_image_embed):
            text = run_hook(self.hook_text_embed, text.masked_fill(mask, 0.0))
            image = run_hook(self.hook_image_embed, torch.zeros_like(text).masked_scatter(mask, features))
            embeds = text + image
        else:
            embeds = text.masked_scatter(mask, features)
        return run_hook(self.hook_embed, embeds)


class DecoderLM(MergedEmbeds, LanguageWeights, StackedWeights, nn.Module):
    # The forward is its blocks in sequence, each called as ``block(resid, rotary, mask, causal, kv)`` with the
    # same rotary tables and mask, then ``unembed(ln_final(resid))``: a run may resume at any block from a cached
    # ``resid_pre`` (the patching shortcut, patching/prefix.py). Every subclass declares it anew.
    resumable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "resumable" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must declare `resumable` (see DecoderLM)")

    def __init__(self, cfg: TowerConfig, rotary: Rotary | None):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_text_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_image_embed = HookPoint()
        self.hook_embed = HookPoint()
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        self.rotary = rotary
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
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
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"]:
        """Logits (of the last ``logits_to_keep`` positions if non-zero, as HF), or the residual stream
        entering block ``stop_at_layer``."""
        batch, pos = embeds.shape[:2]
        past = cache.length if cache is not None else 0
        learned = self.rotary is None
        if position_ids is None and learned and attention_mask is not None:
            # As HF's OPT: positions count real tokens, so left padding does not shift them (pads read row 0).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + pos, device=embeds.device).expand(batch, -1)
        if learned and past + pos > self.cfg.n_ctx and int(position_ids.max()) >= self.cfg.n_ctx:
            raise ValueError(
                f"the sequence reaches position {int(position_ids.max())} but this language model has "
                f"{self.cfg.n_ctx} learned positions (max_position_embeddings); shorten the prompt or generate fewer tokens"
            )
        rotary = None if learned else self.rotary(position_ids, embeds.dtype)
        mask, causal = self._mask(attention_mask, batch, pos, past, embeds)
        resid = embeds
        if learned:
            resid = embeds + run_hook(self.hook_pos_embed, self.pos_embed(position_ids))
        for i, block in enumerate(self.blocks[:stop_at_layer]):
            resid = block(resid, rotary, mask, causal, cache[i] if cache is not None else None)
        if stop_at_layer is not None:
            return resid
        return self.unembed(self.ln_final(resid)[:, -logits_to_keep:])

    def _mask(
        self, attention_mask: Tensor | None, batch: int, pos: int, past: int, like: Tensor
    ) -> tuple[Bool[Tensor, "batch 1 q k"] | None, bool]:
        return causal_mask(attention_mask, pos, past, like, self.cfg.sliding_window)


def causal_mask(
    attention_mask: Tensor | None, pos: int, past: int, like: Tensor, window: int | None
) -> tuple[Bool[Tensor, "batch 1 q k"] | None, bool]:
    """Boolean mask (True = may attend), or (None, causal) when SDPA's causal masking (or none) is exact; ``window``:
    a sliding window (None: none)."""
    total = past + pos
    padded = attention_mask is not None and not bool(attention_mask.all())
    windowed = window is not None and total > window
    if not padded and not windowed:
        if past == 0:
            return None, True
        if pos == 1:
            return None, False
    q = torch.arange(past, total, device=like.device)[:, None]
    k = torch.arange(total, device=like.device)[None, :]
    allowed = (k <= q)[None, None]
    if windowed:
        allowed = allowed & (q - k < window)[None, None]
    if padded:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return allowed, False
