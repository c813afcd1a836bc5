"""Vision-to-language projector: an MLP from (concatenated) vision features to the LM width."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import MLP
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
