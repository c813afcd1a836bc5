"""SigLIP 2's NaFlex patch embedding: pre-flattened patches through a linear patchifier, plus the learned
``side x side`` position grid resized to each image's own ``(h, w)`` patch grid.

The processor resizes each image (aspect ratio kept) to at most ``max_num_patches`` patches, flattens them row-major
as ``(patch_row, patch_col, channel)`` pixels and pads every image to the same number of patches. ``W_patch`` is kept
in the conv layout ``[d_model, channel, p, p]`` that CLIP's and SigLIP's ViTs use (so patch filters read the same
across ViTs); it is a view of HF's ``[d_model, p * p * channel]`` linear weight, and the forward multiplies by that
weight itself. The position grid is resized with bilinear interpolation and antialiasing (``F.interpolate(mode=
"bilinear", align_corners=False, antialias=True)``), computed as HF 5.x computes it: explicit separable weights in
float32, one product with the grid, cast back, so half precision is HF's bit for bit. Padded patches read the
resized grid's first position, as in HF; they are masked as keys downstream.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def resize_positions(
    grid: Float[Tensor, "side side d_model"], spatial_shapes: Int[Tensor, "image 2"], length: int
) -> Float[Tensor, "image patch d_model"]:
    """The grid resized to every image's ``(h, w)``, flattened row-major and padded to ``length`` patches."""
    side = grid.shape[0]
    sizes = spatial_shapes.float()[:, None]  # [image, 1, 2]
    out = torch.arange(length, device=spatial_shapes.device, dtype=torch.float32)[None, :, None]
    rows = torch.div(out, sizes[..., 1:], rounding_mode="floor")
    index = torch.cat([rows, out - rows * sizes[..., 1:]], dim=-1)  # [image, patch, 2]: (row, col)
    index = index * (out < sizes.prod(-1, keepdim=True))  # padding: position (0, 0)
    # Antialiased bilinear: a triangle filter stretched by the scale when shrinking, normalised per output.
    scale = side / sizes
    support = scale.clamp(min=1)
    center = (index + 0.5) * scale - 0.5
    source = torch.arange(side, device=spatial_shapes.device, dtype=torch.float32)
    weights = (1 - (source - center[..., None]).abs_().div_(support[..., None])).clamp_(min=0)
    weights = weights / weights.sum(-1, keepdim=True)  # [image, patch, 2, side]
    weights = (weights[..., 0, :, None] * weights[..., 1, None, :]).flatten(-2)  # separable: row x col
    flat = grid.reshape(-1, grid.shape[-1])
    return (weights.to(flat.device) @ flat.float()).to(grid.dtype)


class NaFlexPatchEmbed(nn.Module):
    def __init__(self, d_model: int, patch_size: int, num_channels: int, side: int):
        super().__init__()
        self.patch_size, self.side = patch_size, side
        self.W_patch = nn.Parameter(torch.empty(d_model, num_channels, patch_size, patch_size))
        self.b_patch = nn.Parameter(torch.zeros(d_model))
        self.W_pos = nn.Parameter(torch.empty(side * side, d_model))  # the learned grid, row-major

    def forward(self, patches: Float[Tensor, "image patch pixels"]) -> Float[Tensor, "image patch d_model"]:
        weight = self.W_patch.permute(0, 2, 3, 1).flatten(1)  # HF's linear layout (p, p, channel): its own storage
        return F.linear(patches.to(weight.dtype), weight, self.b_patch)

    def positions(self, spatial_shapes: Int[Tensor, "image 2"], length: int) -> Float[Tensor, "image patch d_model"]:
        return resize_positions(self.W_pos.reshape(self.side, self.side, -1), spatial_shapes, length)
