"""Gemma 2 / 3 decoder block: RMSNorm before and after each sublayer (``ln1`` -> attn -> ``ln1_post``, ``ln2`` ->
MLP -> ``ln2_post``), so what a sublayer writes into the residual stream is the post-norm's output.

``hook_attn_out`` / ``hook_mlp_out`` hold that output (after ``ln1_post`` / ``ln2_post``): it is what the stream
receives, so ``resid_pre + attn_out == resid_mid`` and decompositions stay exact. ``attn.hook_result`` are the
heads before the post-norm, whose sum is its input, not ``hook_attn_out``. Gemma 1 blocks are plain pre-norm
``TransformerBlock``s; both take a (cos, sin) table and a mask chosen per layer by the tower (sliding or global).
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.norms import RMSNorm
from tl_vlm.config import TowerConfig


class GemmaBlock(TransformerBlock):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        # Not folded by fold_ln: a weight after the normalisation cannot move into the linear map before it.
        self.ln1_post = RMSNorm(cfg.d_model, cfg.eps)
        self.ln2_post = RMSNorm(cfg.d_model, cfg.eps)

    def attn_written(self, attn_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.ln1_post(attn_out)

    def mlp_written(self, mlp_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.ln2_post(mlp_out)
