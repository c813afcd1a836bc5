"""A pre-norm block whose attention and MLP outputs are scaled by ``tanh(gate_attn)`` / ``tanh(gate_ffn)`` before
they join the residual stream (Mllama's global vision layers). ``hook_attn_out`` / ``hook_mlp_out`` hold the gated
outputs, so the stream is still their sum; ``attn.hook_result`` and the MLP's neurons are before the gate."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.attention import AttentionMask
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.config import TowerConfig


class GatedBlock(TransformerBlock):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
        resid_pre_hooked: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not resid_pre_hooked:
            resid = run_hook(self.hook_resid_pre, resid)
        if "hook_q_input" in self.attn._modules:  # TL's use_split_qkv_input, as TransformerBlock
            q_in, k_in, v_in = self._split_inputs(resid)
            attn = self.attn(q_in, rotary, mask, causal, cache, key_input=k_in, value_input=v_in)
        else:
            attn = self.attn(self.ln1(resid), rotary, mask, causal, cache)
        attn_out = run_hook(self.hook_attn_out, self.gate_attn.tanh() * attn)
        resid = run_hook(self.hook_resid_mid, resid + attn_out)
        mlp_in = run_hook(self.hook_mlp_in, resid.clone()) if "hook_mlp_in" in self._modules else resid
        mlp_out = run_hook(self.hook_mlp_out, self.gate_ffn.tanh() * self.mlp(self.ln2(mlp_in)))
        return run_hook(self.hook_resid_post, resid + mlp_out)
