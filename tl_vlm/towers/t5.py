"""T5 / Flan-T5 encoder-decoder language tower (BLIP-2 and InstructBLIP with Flan-T5).

The VLM's input (token embeddings with the projected queries merged in, ``hook_embed``) enters the
encoder; the decoder reads the encoder output through cross-attention and predicts the answer.
Hooks: ``encoder.blocks.{i}.*`` (pre-norm ``TransformerBlock``s), ``decoder.blocks.{i}.*`` with
``decoder.blocks.{i}.cross_attn.*`` (``CrossAttentionBlock``), ``{encoder,decoder}.hook_rel_pos_bias``
(``[1, head, q, k]``, shared by every layer of the stack as in T5), ``decoder.hook_embed`` (decoder
token embeddings), ``{encoder,decoder}.ln_final.*``. T5 does not scale attention scores, uses an RMS
norm without mean subtraction and a gated-gelu feed-forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import Embed, KVCache, TransformerBlock, Unembed, make_norm
from tl_vlm.components.attention import causal_block
from tl_vlm.components.cross_block import CrossAttentionBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.relative_position import RelativePositionBias
from tl_vlm.config import T5Config
from tl_vlm.towers.language import MergedEmbeds
from tl_vlm.towers.stacked import LanguageWeights, StackedWeights


class T5Stack(StackedWeights, nn.Module):
    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.cfg, self.is_decoder = cfg, decoder
        if decoder:
            self.hook_embed = HookPoint()  # [batch, pos, d_model]: decoder token embeddings
        self.rel_pos = RelativePositionBias(
            cfg.relative_attention_num_buckets, cfg.n_heads, cfg.relative_attention_max_distance,
            bidirectional=not decoder,
        )
        self.hook_rel_pos_bias = HookPoint()
        block = (lambda i: CrossAttentionBlock(cfg, i, cfg.d_model)) if decoder else (lambda i: TransformerBlock(cfg, i))
        self.blocks = nn.ModuleList([block(i) for i in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch total_pos"] | None = None,
        context: Float[Tensor, "batch ctx d_model"] | None = None,
        context_mask: Int[Tensor, "batch ctx"] | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        q_len = x.shape[1]
        past = cache.length if cache is not None else 0
        bias = run_hook(self.hook_rel_pos_bias, self.rel_pos(q_len, past + q_len, past).to(x.dtype))
        allowed = None
        if self.is_decoder and q_len > 1:
            allowed = ~causal_block(q_len, past + q_len, x.device)
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask[:, None, None, :].bool()
            allowed = keep if allowed is None else allowed & keep
        # As HF's SDPA path: the bias where a key is visible, the dtype's minimum where it is not.
        mask = bias if allowed is None else torch.where(allowed, bias, torch.finfo(x.dtype).min)
        cross_mask = None
        if context_mask is not None and not bool(context_mask.all()):
            cross_mask = context_mask[:, None, None, :].bool()
        for i, block in enumerate(self.blocks):
            if self.is_decoder:
                x = block(x, context, mask, cross_mask, cache[i] if cache is not None else None)
            else:
                x = block(x, mask=mask)
        return self.ln_final(x)


class T5LM(MergedEmbeds, LanguageWeights, nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        decoder_cfg = cfg.replace(n_layers=cfg.n_decoder_layers, attention_dir="causal")
        self.embed = Embed(cfg.d_vocab, cfg.d_model)  # shared by encoder and decoder
        self.hook_text_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_image_embed = HookPoint()
        self.hook_embed = HookPoint()
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(decoder_cfg, decoder=True)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)

    def encode(
        self, embeds: Float[Tensor, "batch pos d_model"], attention_mask: Int[Tensor, "batch pos"] | None
    ) -> Float[Tensor, "batch pos d_model"]:
        return self.encoder(embeds, attention_mask)

    def decode(
        self,
        decoder_input_ids: Int[Tensor, "batch dec_pos"],
        encoded: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        decoder_attention_mask: Int[Tensor, "batch total_dec_pos"] | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> Float[Tensor, "batch dec_pos d_vocab"]:
        x = run_hook(self.decoder.hook_embed, self.embed(decoder_input_ids))
        hidden = self.decoder(x, decoder_attention_mask, encoded, attention_mask, cache)[:, -logits_to_keep:]
        if self.cfg.scale_decoder_outputs:  # tied-embedding T5 rescales before its unembedding
            hidden = hidden * self.cfg.d_model**-0.5
        return self.unembed(hidden)
