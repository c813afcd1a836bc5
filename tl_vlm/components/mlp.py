"""Feed-forward block: plain (CLIP, OPT, projector) or gated (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import run_hook


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool, bias: bool, d_out: int | None = None):
        super().__init__()
        d_out = d_model if d_out is None else d_out
        self.act_fn = act_fn
        self.act = ACT2FN[act_fn]
        self.W_in = nn.Parameter(layout.empty_in_out(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp)) if bias else None
        self.W_gate = nn.Parameter(layout.empty_in_out(d_model, d_mlp)) if gated else None
        self.b_gate = nn.Parameter(torch.zeros(d_mlp)) if gated and bias else None
        self.W_out = nn.Parameter(layout.empty_in_out(d_mlp, d_out))
        self.b_out = nn.Parameter(torch.zeros(d_out)) if bias else None

        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]; the gate's pre-activation when gated
        if gated:
            self.hook_pre_linear = HookPoint()  # the linear (up) branch
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_out"]:
        if self.W_gate is None:
            pre = run_hook(self.hook_pre, F.linear(x, self.W_in.T, self.b_in))
            post = self.act(pre)
        else:
            pre = run_hook(self.hook_pre, F.linear(x, self.W_gate.T, self.b_gate))
            pre_linear = run_hook(self.hook_pre_linear, F.linear(x, self.W_in.T, self.b_in))
            post = self.act(pre) * pre_linear
        post = run_hook(self.hook_post, post)
        # Flan-T5 in float16 keeps W_out in float32 (as HF): the output then leaves in float32.
        return F.linear(post.to(self.W_out.dtype), self.W_out.T, self.b_out)
