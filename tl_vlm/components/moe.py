"""Sparse mixture-of-experts MLP (Qwen3-MoE / Qwen3-VL-MoE) with every routing decision hooked.

A linear router scores each token against every expert; the top ``k`` experts by softmax probability run, their
outputs weighted by those probabilities renormalised over the ``k`` (HF: ``Qwen3VLMoeTextSparseMoeBlock``).

Hooks (``blocks.{i}.mlp.*``):
- ``hook_router_logits`` [batch, pos, expert]: the router's scores (edit them to reroute).
- ``hook_expert_indices`` [batch, pos, k] (long) and ``hook_expert_weights`` [batch, pos, k]: the chosen experts
  and their weights (TL's MoE names the first the same).
- ``experts.{e}``: each expert is a gated ``MLP`` with TL's weights and hooks (``W_gate``, ``W_in``, ``W_out``,
  ``hook_pre``, ``hook_pre_linear``, ``hook_post``, over the tokens routed to it, ``[token, d_mlp]``), plus
  ``experts.{e}.hook_out`` [batch, pos, d_model]: its weighted output, zero at tokens not routed to it. The MLP
  output is the sum of these, so zeroing one expert's ``hook_out`` ablates it, and patching it patches it.
Idle, experts run only on their tokens, as HF's eager loop (same order, so half precision is HF's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import active, run_hook
from tl_vlm.components.mlp import MLP


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int
    top_k: int
    d_expert: int  # each expert's hidden width (HF: moe_intermediate_size)
    sparse_layers: tuple[int, ...]  # the blocks whose MLP is the MoE (the others are dense)


class Expert(MLP):
    """One gated expert; ``hook_out`` holds its weighted contribution at every position."""

    def __init__(self, d_model: int, d_expert: int, act_fn: str):
        super().__init__(d_model, d_expert, act_fn, gated=True, bias=False)
        self.hook_out = HookPoint()  # [batch, pos, d_model]


class MoE(nn.Module):
    def __init__(self, d_model: int, act_fn: str, cfg: MoEConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.W_router = nn.Parameter(layout.empty_in_out(d_model, cfg.n_experts))
        self.experts = nn.ModuleList([Expert(d_model, cfg.d_expert, act_fn) for _ in range(cfg.n_experts)])
        self.hook_router_logits = HookPoint()  # [batch, pos, expert]
        self.hook_expert_indices = HookPoint()  # [batch, pos, k]
        self.hook_expert_weights = HookPoint()  # [batch, pos, k]
        self.register_parameter("b_out", None)  # no output bias (TL's accumulated_bias asks every MLP)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        logits = run_hook(self.hook_router_logits, F.linear(x, self.W_router.T))
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(logits.dtype)
        indices = run_hook(self.hook_expert_indices, indices)
        weights = run_hook(self.hook_expert_weights, weights)
        flat, flat_indices, flat_weights = x.reshape(-1, x.shape[-1]), indices.reshape(-1, self.top_k), weights.reshape(-1, self.top_k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(flat_indices.T == e)  # HF's order: by slot, then token
            hooked = active(expert.hook_out)
            if not len(token) and not hooked:
                continue
            y = expert(flat[token]) * flat_weights[token, slot, None]
            if hooked:
                full = torch.zeros_like(flat).index_copy(0, token, y.to(flat.dtype))
                out = out + run_hook(expert.hook_out, full.view_as(x)).reshape_as(flat)
            else:
                out.index_add_(0, token, y.to(out.dtype))
        return out.view_as(x)
