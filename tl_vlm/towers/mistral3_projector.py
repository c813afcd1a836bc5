"""Mistral3's projector: RMSNorm each patch, merge each 2x2 block of an image's patch grid, then an MLP.

Hooks (rows are images, padded to the image with the most tokens): ``projector.hook_in`` [image, patch, d_vision]
(the vision tower's output, raster order), ``projector.ln.*``, ``projector.hook_unfolded`` [image, token,
d_vision * merge**2] (one token per merge block, blocks in raster order over the merged grid), ``projector.hook_merged``
[image, token, d_vision] (after the learned merge ``W_merge``), ``projector.mlp.hook_pre|post`` and
``projector.hook_out`` [image, token, d_out].

An unfolded vector is laid out as HF's ``nn.functional.unfold`` lays it out: channel-major, i.e. entry
``c * merge**2 + (i * merge + j)`` is channel ``c`` of the block's patch (i, j); ``W_merge`` rows follow that order.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import MLP, RMSNorm
from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import run_hook


class Mistral3Projector(nn.Module):
    def __init__(self, d_vision: int, d_out: int, merge_size: int, act_fn: str, bias: bool, eps: float):
        super().__init__()
        self.merge_size = merge_size
        self.hook_in = HookPoint()
        self.ln = RMSNorm(d_vision, eps)
        self.hook_unfolded = HookPoint()
        self.W_merge = nn.Parameter(layout.empty_in_out(d_vision * merge_size**2, d_vision))
        self.hook_merged = HookPoint()
        self.mlp = MLP(d_vision, d_out, act_fn, gated=False, bias=bias, d_out=d_out)
        self.hook_out = HookPoint()

    def forward(
        self, x: Float[Tensor, "image patch d_vision"], grids: list[tuple[int, int]]
    ) -> Float[Tensor, "image token d_out"]:
        """``grids``: each image's (rows, cols) of patches, multiples of the merge size."""
        x = self.ln(run_hook(self.hook_in, x))
        m, d = self.merge_size, x.shape[-1]
        blocks = []
        for i, (h, w) in enumerate(grids):
            grid = x[i, : h * w].view(h, w, d).permute(2, 0, 1)[None]
            blocks.append(F.unfold(grid, kernel_size=m, stride=m).view(d * m * m, -1).T)
        unfolded = run_hook(self.hook_unfolded, nn.utils.rnn.pad_sequence(blocks, batch_first=True))
        merged = run_hook(self.hook_merged, F.linear(unfolded, self.W_merge.T))
        return run_hook(self.hook_out, self.mlp(merged))
