"""Pixel-shuffle (space-to-depth) connector of InternVL and Idefics3 / SmolVLM.

Each ``scale x scale`` block of a vision row's square patch grid becomes one language token: the block's patch
vectors are concatenated (channel order: block row, then block column, then the patch's channels) and an MLP maps
them to the language width. Tokens are in row-major order of the block grid. InternVL (``pixel_shuffle`` with
``downsample_ratio`` 0.5) and Idefics3 (``scale_factor`` 2) write the same view / permute steps under different
names; ``tests/test_pixel_shuffle.py`` checks both against this one function on random tensors.

Hooks: ``projector.hook_in`` [row, patch, d_vision] (the vision features, class token already dropped),
``projector.hook_shuffled`` [row, token, scale**2 * d_vision], ``projector.ln.*`` (InternVL's LayerNorm),
``projector.mlp.hook_pre|post`` (InternVL's two linears; Idefics3 has one linear map, ``projector.W``, and no
MLP) and ``projector.hook_out`` [row, token, d_out].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import MLP, make_norm
from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import run_hook


def pixel_shuffle(x: Float[Tensor, "row patch d"], scale: int) -> Float[Tensor, "row token d_shuffled"]:
    """Space-to-depth over a square patch grid: token (i, j) holds patches (i*s + dr, j*s + dc), dr-major."""
    rows, n, d = x.shape
    grid = math.isqrt(n)
    if grid * grid != n or grid % scale:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {scale}, got {n} patches")
    g = grid // scale
    return x.reshape(rows, g, scale, g, scale, d).permute(0, 1, 3, 2, 4, 5).reshape(rows, g * g, scale * scale * d)


def token_patches(grid: int, scale: int) -> list[list[tuple[int, int]]]:
    """For each shuffled token (row-major over the ``grid // scale`` block grid), the (row, col) patches it holds,
    in its channel order."""
    g = grid // scale
    return [
        [(i * scale + dr, j * scale + dc) for dr in range(scale) for dc in range(scale)]
        for i in range(g)
        for j in range(g)
    ]


@dataclass
class PixelShuffleConfig:
    d_vision: int
    scale: int
    d_out: int
    d_hidden: int | None  # the MLP's hidden width; None: one linear map without bias (Idefics3)
    act_fn: str
    ln: bool  # InternVL normalises the shuffled vector first
    ln_eps: float = 1e-5


class PixelShuffleProjector(nn.Module):
    def __init__(self, cfg: PixelShuffleConfig):
        super().__init__()
        self.cfg = cfg
        d_in = cfg.d_vision * cfg.scale**2
        self.hook_in = HookPoint()
        self.hook_shuffled = HookPoint()
        self.ln = make_norm("LN", d_in, cfg.ln_eps) if cfg.ln else None
        if cfg.d_hidden is None:
            self.W = nn.Parameter(layout.empty_in_out(d_in, cfg.d_out))
        else:
            self.mlp = MLP(d_in, cfg.d_hidden, cfg.act_fn, gated=False, bias=True, d_out=cfg.d_out)
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "row patch d_vision"]) -> Float[Tensor, "row token d_out"]:
        x = run_hook(self.hook_shuffled, pixel_shuffle(run_hook(self.hook_in, x), self.cfg.scale))
        if self.ln is not None:
            x = self.ln(x)
        return run_hook(self.hook_out, self.mlp(x) if self.cfg.d_hidden is not None else F.linear(x, self.W.T))
