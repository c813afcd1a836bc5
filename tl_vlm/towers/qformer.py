"""Q-Former tower (BLIP-2, InstructBLIP): learned query tokens read the image through cross-attention.

The input sequence is the query tokens (``hook_query_embed``) followed, for InstructBLIP, by the
instruction tokens (word + learned position embeddings, ``hook_text_embed`` / ``hook_pos_embed``);
one LayerNorm (``ln_embed``) normalises both. Blocks are post-LN (see ``QFormerBlock``); layers
``i % cross_attention_frequency == 0`` cross-attend to the image embeddings. The output keeps every
position; the family reads the first ``n_query`` (the query outputs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import Embed, LayerNorm, PosEmbed
from tl_vlm.components.hooks import active, run_hook
from tl_vlm.components.qformer_block import QFormerBlock
from tl_vlm.config import QFormerConfig
from tl_vlm.towers.stacked import StackedWeights


class QFormer(StackedWeights, nn.Module):
    def __init__(self, cfg: QFormerConfig, text_input: bool):
        super().__init__()
        self.cfg, self.n_query = cfg, cfg.num_query_tokens
        n_query, d_image, cross_attention_frequency = cfg.num_query_tokens, cfg.d_vision, cfg.cross_attention_frequency
        self.query_tokens = nn.Parameter(torch.empty(n_query, cfg.d_model))
        self.hook_query_embed = HookPoint()  # [batch, query, d_model]
        if text_input:
            self.embed = Embed(cfg.d_vocab, cfg.d_model)
            self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model)
            self.hook_text_embed = HookPoint()  # [batch, text, d_model]
            self.hook_pos_embed = HookPoint()
        self.text_input = text_input
        self.ln_embed = LayerNorm(cfg.d_model, cfg.eps)
        self.blocks = nn.ModuleList(
            [
                QFormerBlock(cfg, i, d_image if i % cross_attention_frequency == 0 else None, text_mlp=text_input)
                for i in range(cfg.n_layers)
            ]
        )

    @property
    def dtype(self) -> torch.dtype:
        """What the blocks compute in: float32 in a float16 BLIP-2 (HF keeps its Q-Former so); HF reads its
        embedding LayerNorm's dtype the same way."""
        return self.ln_embed.w.dtype

    def forward(
        self,
        image: Float[Tensor, "batch patch d_image"],
        input_ids: Int[Tensor, "batch text"] | None = None,
        attention_mask: Int[Tensor, "batch text"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        batch = image.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        if active(self.hook_query_embed):  # a copy: an in-place hook must not write into the parameter
            queries = run_hook(self.hook_query_embed, queries.clone())
        x, mask = queries, None
        if input_ids is not None:
            if not self.text_input:
                raise ValueError("this Q-Former takes no instruction tokens (qformer_input_ids are InstructBLIP's)")
            if input_ids.shape[0] != batch:
                raise ValueError(
                    f"qformer_input_ids hold {input_ids.shape[0]} rows for {batch} images; InstructBLIP reads one "
                    "instruction per image (build them together with the processor)"
                )
            if input_ids.shape[1] > self.cfg.n_ctx:
                raise ValueError(
                    f"qformer_input_ids hold {input_ids.shape[1]} tokens but the Q-Former has {self.cfg.n_ctx} learned "
                    "positions (qformer_config.max_position_embeddings); shorten the instruction"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1)
            text = run_hook(self.hook_text_embed, self.embed(input_ids))
            pos = self.pos_embed(positions)
            if active(self.hook_pos_embed):
                pos = run_hook(self.hook_pos_embed, pos.clone())
            x = torch.cat([queries, text + pos], dim=1)
            if attention_mask is not None and not bool(attention_mask.all()):
                keep = torch.cat([attention_mask.new_ones(batch, self.n_query), attention_mask], dim=1).bool()
                mask = keep[:, None, None, :]
        resid = self.ln_embed(x.to(self.dtype))  # float32 query tokens / word embeddings round here, as in HF
        for block in self.blocks:
            resid = block(resid, image, self.n_query, mask)
        return resid
