"""Vision-to-language projectors: an MLP (LLaVA) or one linear map (BLIP-2's ``language_projection``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import MLP
from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import run_hook


@dataclass
class ProjectorConfig:
    d_in: int
    d_hidden: int
    d_out: int
    act_fn: str
    bias: bool


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.hook_in = HookPoint()  # [image, patch, d_in]
        self.mlp = MLP(cfg.d_in, cfg.d_hidden, cfg.act_fn, gated=False, bias=cfg.bias, d_out=cfg.d_out)
        self.hook_out = HookPoint()  # [image, patch, d_out]

    def forward(self, x: Float[Tensor, "image patch d_in"]) -> Float[Tensor, "image patch d_out"]:
        return run_hook(self.hook_out, self.mlp(run_hook(self.hook_in, x)))


class LinearProjector(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.hook_in = HookPoint()  # [image, query, d_in]
        self.W = nn.Parameter(layout.empty_in_out(d_in, d_out))
        self.b = nn.Parameter(torch.zeros(d_out))
        self.hook_out = HookPoint()  # [image, query, d_out]

    def forward(self, x: Float[Tensor, "image pos d_in"]) -> Float[Tensor, "image pos d_out"]:
        return run_hook(self.hook_out, F.linear(run_hook(self.hook_in, x), self.W.T, self.b))
