"""Qwen2-VL / Qwen2.5-VL vision tower: dynamic resolution, 2D rotary, per-frame and window attention.

HF runs every image (and video) of a batch as one packed sequence of patches and cuts attention at
image and frame boundaries. Here each visual input is one row of an ``[image, patch, ...]`` layout, padded
to the longest input, so every hook has TransformerLens' shapes with the image first:

- Rows: the images in ``image_grid_thw`` order, then the videos in ``video_grid_thw`` order.
- Patches within a row: the processor's order (the order of the ``pixel_values`` rows), i.e. temporal
  patch ``t`` major, then 2x2 merge blocks in raster order over the grid, then the 4 patches of a block
  in raster order. Consecutive groups of ``merge_size**2`` patches form one language token.
- Padding: rows shorter than the longest are padded at the end; ``PatchLayout.valid`` marks real patches.
  Padded patches only attend to each other and never reach real patches or the language model.
- Attention: a patch attends to the patches of its own temporal patch (HF: one sequence per frame).
  In Qwen2.5-VL's windowed blocks (all but ``fullatt_block_indexes``) it attends to its own window only.
  Patterns stay in the processor's patch order, so ``hook_pattern`` is ``[image, head, patch, patch]``
  with exact zeros outside a patch's frame (and window); ``PatchLayout.window`` gives each patch's window,
  e.g. ``pattern[..., order, :][..., order]`` with ``order = model.vision.patch_layout(grid).window[i].argsort(stable=True)`` shows
  the block-diagonal window structure in HF's window order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from tl_vlm.components import TransformerBlock
from tl_vlm.components.axial_rotary import AxialRotary
from tl_vlm.components.segments import Segments
from tl_vlm.components.hooks import run_hook
from tl_vlm.config import TowerConfig
from tl_vlm.towers.stacked import StackedWeights


@dataclass(frozen=True)
class PatchGeometry:
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge_size: int
    window_size: int | None = None  # pixels; None: every block sees the whole frame (Qwen2-VL)
    full_attention_blocks: tuple[int, ...] = ()

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class PatchLayout:
    """Where the patches of each visual input sit in the padded ``[image, patch]`` layout."""

    lengths: list[int]  # real patches per row: t * h * w
    valid: Bool[Tensor, "image patch"]
    positions: Int[Tensor, "image patch 2"]  # (row, col) in the patch grid; rotary positions
    frame: Int[Tensor, "image patch"]  # temporal patch index; -1 at padding
    window: Int[Tensor, "image patch"] | None  # window index within the row; -1 at padding; None without windows
    # (row, patch indices) of each attention segment as HF runs them: every frame; every window, in HF's order
    frame_parts: list[tuple[int, Tensor]]
    window_parts: list[tuple[int, Tensor]] | None


class VideoPatchEmbed(nn.Module):
    """Conv3d patchifier (kernel = stride = temporal x spatial patch) applied to pre-cut patch rows."""

    def __init__(self, d_model: int, geometry: PatchGeometry):
        super().__init__()
        g = geometry
        kernel = (g.temporal_patch_size, g.patch_size, g.patch_size)
        self.W_patch = nn.Parameter(torch.empty(d_model, g.in_channels, *kernel))

    def forward(self, patches: Float[Tensor, "patches patch_dim"]) -> Float[Tensor, "patches d_model"]:
        # One conv window per row, i.e. a linear map of the flattened row; run as HF's conv so that half-precision
        # results are HF's bit for bit (the two kernels round differently in float16).
        w = self.W_patch
        return F.conv3d(patches.to(w.dtype).view(-1, *w.shape[1:]), w, stride=w.shape[2:]).view(-1, w.shape[0])


class QwenVisionTower(StackedWeights, nn.Module):
    def __init__(self, cfg: TowerConfig, geometry: PatchGeometry, rotary: AxialRotary):
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        self.embed = VideoPatchEmbed(cfg.d_model, geometry)
        self.hook_embed = HookPoint()  # [image, patch, d_model]
        self.rotary = rotary
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])

    def patch_layout(self, grid_thw: Int[Tensor, "image 3"]) -> PatchLayout:
        g = self.geometry
        lengths = grid_thw.prod(-1).tolist()
        n, longest = len(lengths), max(lengths)
        device = grid_thw.device
        valid = torch.zeros(n, longest, dtype=torch.bool, device=device)
        positions = torch.zeros(n, longest, 2, dtype=torch.long, device=device)
        frame = torch.full((n, longest), -1, dtype=torch.long, device=device)
        window = frame.clone() if g.window_size is not None else None
        frame_parts, window_parts = [], [] if window is not None else None
        for i, (grid, length) in enumerate(zip(grid_thw, lengths)):
            t, h, w = grid.tolist()
            valid[i, :length] = True
            positions[i, :length] = get_vision_position_ids(grid[None], g.merge_size)
            frame[i, :length] = torch.arange(t, device=device).repeat_interleave(h * w)
            frame_parts += [(i, torch.arange(f * h * w, (f + 1) * h * w, device=device)) for f in range(t)]
            if window is not None:
                window[i, :length], parts = self._windows(grid, length)
                window_parts += [(i, part) for part in parts]
        return PatchLayout(lengths, valid, positions, frame, window, frame_parts, window_parts)

    def _windows(self, grid: Int[Tensor, " 3"], length: int) -> tuple[Int[Tensor, " patch"], list[Tensor]]:
        """Window of each patch, and each window's patches in HF's order, from HF's own window partition (a
        permutation of merge blocks)."""
        g = self.geometry
        unit = g.merge_size**2
        order, bounds = get_vision_window_index(grid[None], g.merge_size, g.window_size, g.patch_size)
        # Patch j of HF's window order is patch `natural[j]` of the processor's order.
        natural = (order[:, None] * unit + torch.arange(unit)).flatten().to(grid.device)
        patches = torch.arange(length, device=grid.device)
        in_window_order = torch.searchsorted(bounds[1:].to(grid.device), patches, right=True)
        window = torch.empty(length, dtype=torch.long, device=grid.device)
        window[natural] = in_window_order
        parts = [natural[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()) if b > a]
        return window, parts

    def forward(
        self, pixel_values: Float[Tensor, "patches patch_dim"], grid_thw: Int[Tensor, "image 3"]
    ) -> tuple[Float[Tensor, "image patch d_model"], PatchLayout]:
        """Final hidden states of every visual input, padded to the longest, and their layout."""
        layout = self.checked_layout(pixel_values, grid_thw)
        x = run_hook(self.hook_embed, padded(self.embed(pixel_values), layout))
        rotary = self.rotary(layout.positions)
        frames = Segments(layout.frame_parts, segment_mask(layout.frame), ordered=True)
        windows = frames if layout.window is None else Segments(layout.window_parts, segment_mask(layout.window))
        for i, block in enumerate(self.blocks):
            full = layout.window is None or i in self.geometry.full_attention_blocks
            x = block(x, rotary, frames if full else windows)
        return x, layout

    def checked_layout(
        self, pixel_values: Float[Tensor, "patches patch_dim"], grid_thw: Int[Tensor, "image 3"]
    ) -> PatchLayout:
        """The layout of ``grid_thw``, after checking that ``pixel_values`` holds its patches."""
        g = self.geometry
        if pixel_values.ndim != 2 or pixel_values.shape[1] != g.patch_dim:
            raise ValueError(
                f"Qwen vision pixel_values must be [patches, {g.patch_dim}] (channel x temporal x patch x patch), got "
                f"{tuple(pixel_values.shape)}; use the model's image processor"
            )
        layout = self.patch_layout(grid_thw)
        if pixel_values.shape[0] != sum(layout.lengths):
            raise ValueError(
                f"grid_thw {grid_thw.tolist()} implies {sum(layout.lengths)} patches but pixel_values holds "
                f"{pixel_values.shape[0]} rows"
            )
        return layout


def padded(packed: Float[Tensor, "patches d"], layout: PatchLayout) -> Float[Tensor, "image patch d"]:
    """Packed patches cut into one row per visual input, padded at the end to the longest."""
    return nn.utils.rnn.pad_sequence(list(packed.split(layout.lengths)), batch_first=True)


def segment_mask(segment: Int[Tensor, "image patch"]) -> Bool[Tensor, "image 1 patch patch"] | None:
    """True where query and key share a segment; None when every row is one segment (SDPA runs unmasked)."""
    if bool((segment == segment[:, :1]).all()):
        return None
    return (segment[:, :, None] == segment[:, None, :])[:, None]
