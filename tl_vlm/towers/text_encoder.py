"""Text tower of a dual encoder (CLIP, SigLIP): token + learned position embeddings, pre-norm blocks, a final
LayerNorm, one pooled position, a projection into the shared embedding space.

CLIP's text tower is causal and pools the first end-of-text token (checkpoints whose config says
``eos_token_id == 2``, written before transformers fixed it, pool the highest token id, as HF still does);
SigLIP's is bidirectional and pools the last position, whatever it holds (its processor pads to
``max_length``, as it was trained). Hooks: ``text.hook_embed`` / ``text.hook_pos_embed`` (they sum to the stream
entering block 0), ``text.blocks.{i}.*``, ``text.ln_final.*``, ``text.hook_pooled`` ``[text, d_model]`` and
``text.hook_embed_out`` ``[text, d_proj]`` (the text embedding before normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import Embed, PosEmbed, TransformerBlock, make_norm
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.projection import Projection
from tl_vlm.config import TowerConfig
from tl_vlm.towers.stacked import StackedWeights


@dataclass
class TextEncoderConfig(TowerConfig):
    d_proj: int = 0
    pool: str = "eos"  # "eos": the first end-of-text token (CLIP); "last": the last position (SigLIP)
    eos_token_id: int | None = None
    proj_bias: bool = False  # SigLIP's text head has a bias, CLIP's text_projection none


class TextEncoder(StackedWeights, nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [text, pos, d_model]
        self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.ln_final = make_norm("LN", cfg.d_model, cfg.eps)
        self.hook_pooled = HookPoint()  # [text, d_model]
        self.proj = Projection(cfg.d_model, cfg.d_proj, cfg.proj_bias)
        self.hook_embed_out = HookPoint()  # [text, d_proj]

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        return self.pos_embed.W_pos

    def forward(
        self, input_ids: Int[Tensor, "text pos"], attention_mask: Int[Tensor, "text pos"] | None = None
    ) -> Float[Tensor, "text d_proj"]:
        n, pos = input_ids.shape
        if pos > self.cfg.n_ctx:
            raise ValueError(
                f"the text tower has {self.cfg.n_ctx} positions (max_position_embeddings) but the texts have {pos} "
                f"tokens; tokenize with truncation=True, max_length={self.cfg.n_ctx} (model.prepare(..., truncation=True)"
                " does, as HF's processors can)"
            )
        pooled_at = self.pool_positions(input_ids)
        positions = torch.arange(pos, device=input_ids.device).expand(n, -1)
        resid = run_hook(self.hook_embed, self.embed(input_ids)) + run_hook(self.hook_pos_embed, self.pos_embed(positions))
        mask, causal = self._mask(attention_mask, pos)
        for block in self.blocks:
            resid = block(resid, None, mask, causal)
        normed = self.ln_final(resid)
        pooled = run_hook(self.hook_pooled, normed[torch.arange(n, device=normed.device), pooled_at])
        return run_hook(self.hook_embed_out, self.proj(pooled))

    def pool_positions(self, input_ids: Int[Tensor, "text pos"]) -> Int[Tensor, " text"]:
        """The position each text is pooled at (HF's rule for the checkpoint's kind)."""
        if self.cfg.pool == "last":
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        if self.cfg.eos_token_id == 2:  # legacy CLIP configs: the end-of-text token has the highest id
            return input_ids.argmax(-1)
        is_eos = input_ids == self.cfg.eos_token_id
        missing = (~is_eos.any(-1)).nonzero()[:, 0].tolist()
        if missing:
            raise ValueError(
                f"texts {missing} hold no end-of-text token (id {self.cfg.eos_token_id}), where CLIP pools its text "
                "embedding; tokenize with the model's processor (it appends one), and truncate with it too"
            )
        return is_eos.int().argmax(-1)

    def _mask(self, attention_mask: Tensor | None, pos: int) -> tuple[Bool[Tensor, "text 1 q k"] | None, bool]:
        """True = may attend; (None, causal) when SDPA's own causal masking (or none) is exact."""
        causal = self.cfg.attention_dir == "causal"
        if attention_mask is None or bool(attention_mask.all()):
            return None, causal
        keys = attention_mask[:, None, None, :].bool()
        if causal:
            q = torch.arange(pos, device=keys.device)
            keys = keys & (q[None, :] <= q[:, None])[None, None]
        return keys, False
