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
from tl_vlm.components.hooks import cached, run_hook
from tl_vlm.components.reused_storage import ReusedStorage


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
        self.reused = ReusedStorage()  # memory of the cached activations, kept from run to run

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_out"]:
        if self.W_gate is None:
            pre = run_hook(self.hook_pre, self._linear(x, self.W_in, self.b_in, self.hook_pre, "pre"))
            post = self.act(pre)
        else:
            pre = run_hook(self.hook_pre, self._linear(x, self.W_gate, self.b_gate, self.hook_pre, "pre"))
            pre_linear = run_hook(self.hook_pre_linear, self._linear(x, self.W_in, self.b_in, self.hook_pre_linear, "linear"))
            act = self.act(pre)
            same = cached(self.hook_post) and act.shape == pre_linear.shape and act.dtype == pre_linear.dtype
            into = self.reused.empty("post", act.shape, act, pre_linear) if same else None
            post = act * pre_linear if into is None else torch.mul(act, pre_linear, out=into)
        post = run_hook(self.hook_post, post)
        # Flan-T5 in float16 keeps W_out in float32 (as HF): the output then leaves in float32.
        return F.linear(post.to(self.W_out.dtype), self.W_out.T, self.b_out)

    def _linear(self, x: Tensor, W: Tensor, b: Tensor | None, hook: HookPoint, slot: str) -> Float[Tensor, "batch pos d_mlp"]:
        """``F.linear(x, W.T, b)``; a cached fp32 activation is written into reused memory (reused_storage.py) by the
        kernel F.linear runs for a contiguous 2-d / 3-d input (addmm / mm over the flattened positions): the same
        numbers."""
        exact = cached(hook) and x.dtype == W.dtype == torch.float32 and x.dim() in (2, 3) and x.is_contiguous()
        into = self.reused.empty(slot, (*x.shape[:-1], W.shape[1]), x, W, *(() if b is None else (b,))) if exact else None
        if into is None:
            return F.linear(x, W.T, b)
        flat, out = x.view(-1, x.shape[-1]), into.view(-1, W.shape[1])
        torch.mm(flat, W, out=out) if b is None else torch.addmm(b, flat, W, out=out)
        return into
