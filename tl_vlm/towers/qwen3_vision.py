"""Qwen3-VL vision tower: the Qwen2-VL layout (``towers/qwen_vision.py``: one row per image / video, patches in
the processor's order, attention within each frame) plus a learned position table resampled to each grid.

HF (``Qwen3VLVisionModel``) keeps a square table of ``num_position_embeddings`` learned positions and resamples it
bilinearly (align_corners) to every image's (h, w) patch grid: each patch reads four table rows with weights
(``transformers.vision_utils.get_vision_interpolation_indices_and_weights``, HF's own gather). Hooks:
``vision.hook_embed`` (patch embedding) and ``vision.hook_pos_embed`` (its interpolated position), both
``[image, patch, d_model]``; block 0 reads their sum. The blocks are LayerNorm + GELU(tanh) MLP blocks with 2D
rotary, as Qwen2-VL's. The tower also returns the outputs of the ``deepstack`` blocks (HF's
``deepstack_visual_indexes``), which the projector's DeepStack mergers read.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from tl_vlm.components.axial_rotary import AxialRotary
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.segments import Segments
from tl_vlm.config import TowerConfig
from tl_vlm.towers.qwen_vision import PatchGeometry, PatchLayout, QwenVisionTower, VideoPatchEmbed, padded, segment_mask


class BiasedVideoPatchEmbed(VideoPatchEmbed):
    """Qwen3-VL's Conv3d patchifier has a bias (run inside the conv, as HF, for bit-equal half precision)."""

    def __init__(self, d_model: int, geometry: PatchGeometry):
        super().__init__(d_model, geometry)
        self.b_patch = nn.Parameter(torch.zeros(d_model))

    def forward(self, patches: Float[Tensor, "patches patch_dim"]) -> Float[Tensor, "patches d_model"]:
        w = self.W_patch
        return F.conv3d(patches.to(w.dtype).view(-1, *w.shape[1:]), w, self.b_patch, stride=w.shape[2:]).view(-1, w.shape[0])


class Qwen3VisionTower(QwenVisionTower):
    def __init__(
        self, cfg: TowerConfig, geometry: PatchGeometry, rotary: AxialRotary, n_positions: int, deepstack: tuple[int, ...]
    ):
        super().__init__(cfg, geometry, rotary)
        self.embed = BiasedVideoPatchEmbed(cfg.d_model, geometry)
        self.W_pos = nn.Parameter(torch.empty(n_positions, cfg.d_model))  # HF: visual.pos_embed.weight
        self.grid_side = int(n_positions**0.5)
        self.hook_pos_embed = HookPoint()  # [image, patch, d_model]
        self.deepstack = deepstack

    def position_embeddings(self, grid_thw: Int[Tensor, "image 3"]) -> Float[Tensor, "patches d_model"]:
        """HF's ``fast_pos_embed_interpolate``: the learned table resampled to each grid, in the processor's order."""
        index, weight = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=self.grid_side, mode="bilinear", align_corners=True,
            spatial_merge_size=self.geometry.merge_size,
        )
        return (F.embedding(index, self.W_pos) * weight[:, :, None]).sum(1)

    def forward(
        self, pixel_values: Float[Tensor, "patches patch_dim"], grid_thw: Int[Tensor, "image 3"]
    ) -> tuple[Float[Tensor, "image patch d_model"], PatchLayout, list[Float[Tensor, "image patch d_model"]]]:
        """Final hidden states (padded to the longest row), the layout, and the outputs of the DeepStack blocks."""
        layout = self.checked_layout(pixel_values, grid_thw)
        packed = self.embed(pixel_values)
        pos = self.position_embeddings(grid_thw).to(packed.dtype)
        x = run_hook(self.hook_embed, padded(packed, layout)) + run_hook(self.hook_pos_embed, padded(pos, layout))
        rotary = self.rotary(layout.positions)
        frames = Segments(layout.frame_parts, segment_mask(layout.frame), ordered=True)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, frames)
            if i in self.deepstack:
                deepstack.append(x)
        return x, layout, deepstack
