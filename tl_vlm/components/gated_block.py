"""A pre-norm block whose attention and MLP outputs are scaled by ``tanh(gate_attn)`` / ``tanh(gate_ffn)`` before
they join the residual stream (Mllama's global vision layers). ``hook_attn_out`` / ``hook_mlp_out`` hold the gated
outputs, so the stream is still their sum; ``attn.hook_result`` and the MLP's neurons are before the gate."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.block import TransformerBlock
from tl_vlm.config import TowerConfig


class GatedBlock(TransformerBlock):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def attn_written(self, attn_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.gate_attn.tanh() * attn_out

    def mlp_written(self, mlp_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.gate_ffn.tanh() * mlp_out
