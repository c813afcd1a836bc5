"""A linear map into a dual encoder's shared embedding space (CLIP's ``text_projection`` / ``visual_projection``,
SigLIP's text ``head``), TL layout ``W [d_in, d_out]``; the bias is optional (CLIP has none)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components import param_layout as layout


class Projection(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.W = nn.Parameter(layout.empty_in_out(d_in, d_out))
        self.b = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return F.linear(x, self.W.T, self.b)
