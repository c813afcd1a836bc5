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

from tl_vlm.components.attention import AttentionMask
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.components.norms import RMSNorm
from tl_vlm.config import TowerConfig


class GemmaBlock(TransformerBlock):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        # Not folded by fold_ln: a weight after the normalisation cannot move into the linear map before it.
        self.ln1_post = RMSNorm(cfg.d_model, cfg.eps)
        self.ln2_post = RMSNorm(cfg.d_model, cfg.eps)

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
        resid_pre_hooked: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        """As ``TransformerBlock.forward`` (split per-head inputs, ``hook_mlp_in``), with the post-norms."""
        if not resid_pre_hooked:
            resid = run_hook(self.hook_resid_pre, resid)
        if "hook_q_input" in self.attn._modules:
            q_in, k_in, v_in = self._split_inputs(resid)
            attn_out = self.attn(q_in, rotary, mask, causal, cache, key_input=k_in, value_input=v_in)
        else:
            attn_out = self.attn(self.ln1(resid), rotary, mask, causal, cache)
        attn_out = run_hook(self.hook_attn_out, self.ln1_post(attn_out))
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        mlp_in = run_hook(self.hook_mlp_in, resid.clone()) if "hook_mlp_in" in self._modules else resid
        mlp_out = run_hook(self.hook_mlp_out, self.ln2_post(self.mlp(self.ln2(mlp_in))))
        return run_hook(self.hook_resid_post, resid + mlp_out)
