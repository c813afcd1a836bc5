"""Pixtral vision tower: native resolution, 2D rotary, RMSNorm, gated MLP, no image attending to another.

HF crops each image's patch grid out of the padded ``pixel_values`` (by ``image_sizes``), packs every image's
patches into one sequence and masks attention block-diagonally. Here each image is one row of an
``[image, patch, ...]`` layout, padded to the largest image, as in the Qwen vision tower:

- Rows: the images in ``pixel_values`` / ``image_sizes`` order (all images of the batch, prompt by prompt).
- Patches within a row: raster order over the image's own grid (row-major, ``grid_w`` patches a row), as HF
  flattens them; ``PatchLayout.positions`` holds each patch's (row, col), the rotary positions.
- Padding: rows shorter than the longest are padded at the end; ``PatchLayout.valid`` marks real patches.
  Padded patches attend only to each other and never reach real patches or the language model.
- Attention: a patch attends to every patch of its own image. ``hook_pattern`` is ``[image, head, patch, patch]``;
  the block-diagonal mask of HF's packed sequence is the row structure itself. Where no hook asks for the pattern,
  attention runs as HF runs it (one SDPA call over the packed images with HF's additive block mask), which keeps
  half-precision results HF's bit for bit.

Hidden state ``j`` is the input of block ``j`` (``j = 0``: the patch embeddings after ``ln_pre``), as in HF's
``hidden_states``; blocks after the deepest feature layer run only when hooked (as ``ViTTower``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import TransformerBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.norms import RMSNorm
from tl_vlm.components.pixtral_rotary import PixtralRotary
from tl_vlm.components.segments import Segments
from tl_vlm.config import PixtralViTConfig
from tl_vlm.towers.hidden_states import kept_hidden_states
from tl_vlm.towers.stacked import StackedWeights

LN_EPS = 1e-5  # HF's Pixtral hard-codes the eps of every RMSNorm in the tower


@dataclass
class PatchLayout:
    """Where each image's patches sit in the padded ``[image, patch]`` layout."""

    grids: list[tuple[int, int]]  # (rows, cols) of patches per image
    valid: Bool[Tensor, "image patch"]
    positions: Int[Tensor, "image patch 2"]  # (row, col) of each patch; (0, 0) at padding

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.grids]


@dataclass
class PackedImages(Segments):
    """Attention within each image, run as HF runs it: all images packed into one sequence, SDPA with HF's additive
    block-diagonal mask (``generate_block_attention_mask``), then unpacked into the padded rows."""

    # The additive mask per dtype, built once per forward pass as HF does ([patches, patches]: large images).
    biases: dict[torch.dtype, Tensor] = field(default_factory=dict, init=False, repr=False)

    def block_bias(self, like: Tensor) -> Float[Tensor, "1 1 n n"]:
        if like.dtype not in self.biases:
            lengths = [len(idx) for _, idx in self.parts]
            n = sum(lengths)
            bias = torch.full((n, n), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
            start = 0
            for length in lengths:
                bias[start : start + length, start : start + length] = 0
                start += length
            self.biases[like.dtype] = bias[None, None]
        return self.biases[like.dtype]

    def attend(
        self, q: Float[Tensor, "image head patch d_head"], k: Tensor, v: Tensor, scale: float
    ) -> Float[Tensor, "image head patch d_head"]:
        def pack(t: Tensor) -> Tensor:
            return torch.cat([t[row][:, idx] for row, idx in self.parts], dim=1)[None]

        out = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), attn_mask=self.block_bias(q), scale=scale)[0]
        z = torch.zeros_like(q)
        for (row, idx), part in zip(self.parts, out.split([len(idx) for _, idx in self.parts], dim=1)):
            z[row][:, idx] = part
        return z


class PixtralPatchEmbed(nn.Module):
    """Conv patchifier without bias, run over the padded image batch as HF runs it."""

    def __init__(self, cfg: PixtralViTConfig):
        super().__init__()
        self.W_patch = nn.Parameter(torch.empty(cfg.d_model, cfg.num_channels, cfg.patch_size, cfg.patch_size))

    def forward(self, pixel_values: Float[Tensor, "image channel height width"]) -> Float[Tensor, "image d_model rows cols"]:
        w = self.W_patch
        return F.conv2d(pixel_values.to(w.dtype), w, stride=w.shape[-1])


class PixtralVisionTower(StackedWeights, nn.Module):
    def __init__(self, cfg: PixtralViTConfig, rotary: PixtralRotary):
        super().__init__()
        self.cfg = cfg
        self.embed = PixtralPatchEmbed(cfg)
        self.hook_embed = HookPoint()  # [image, patch, d_model]: patch embeddings before ln_pre
        self.ln_pre = RMSNorm(cfg.d_model, LN_EPS)
        self.rotary = rotary
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])

    def patch_layout(self, image_sizes: Int[Tensor, "image 2"]) -> PatchLayout:
        """The layout of images of these (height, width) pixel sizes (what the processor returns)."""
        ps = self.cfg.patch_size
        grids = [(h // ps, w // ps) for h, w in image_sizes.tolist()]
        longest = max(h * w for h, w in grids)
        device = image_sizes.device
        valid = torch.zeros(len(grids), longest, dtype=torch.bool, device=device)
        positions = torch.zeros(len(grids), longest, 2, dtype=torch.long, device=device)
        for i, (h, w) in enumerate(grids):
            valid[i, : h * w] = True
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            positions[i, : h * w] = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        return PatchLayout(grids, valid, positions)

    def forward(
        self, pixel_values: Float[Tensor, "image channel height width"], image_sizes: Int[Tensor, "image 2"], keep: list[int]
    ) -> tuple[dict[int, Float[Tensor, "image patch d_model"]], PatchLayout]:
        """Hidden states with the requested indices (0..n_layers), padded rows, and their layout."""
        self.check(pixel_values, image_sizes)
        layout = self.patch_layout(image_sizes)
        grid = self.embed(pixel_values)
        patches = [grid[i, :, :h, :w].flatten(1).T for i, (h, w) in enumerate(layout.grids)]
        x = run_hook(self.hook_embed, nn.utils.rnn.pad_sequence(patches, batch_first=True))
        resid = self.ln_pre(x)
        rotary = self.rotary(layout.positions, resid.dtype)
        parts = [(row, torch.arange(n, device=x.device)) for row, n in enumerate(layout.lengths)]
        segment = torch.where(layout.valid, 0, -1)  # padding attends to padding only: no empty softmax rows
        mask = None if bool(layout.valid.all()) else (segment[:, :, None] == segment[:, None, :])[:, None]
        attention = PackedImages(parts, mask)
        return kept_hidden_states(self.blocks, resid, keep, rotary, attention), layout

    def check(self, pixel_values: Tensor, image_sizes: Tensor) -> None:
        """Pixels and sizes must describe the same images, each a whole number of patches inside its pixels."""
        ps, c = self.cfg.patch_size, self.cfg.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c:
            raise ValueError(
                f"Pixtral pixel_values must be [image, {c}, height, width] (images padded to the largest), got "
                f"{tuple(pixel_values.shape)}; use the model's processor (model.prepare)"
            )
        if image_sizes.ndim != 2 or image_sizes.shape[1] != 2 or image_sizes.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"image_sizes must hold one (height, width) per image: shape [{pixel_values.shape[0]}, 2] for these "
                f"pixel_values, got {tuple(image_sizes.shape)}; pass pixel_values and image_sizes from the same processor call"
            )
        height, width = pixel_values.shape[-2:]
        sizes = image_sizes.tolist()
        bad = [(h, w) for h, w in sizes if not (ps <= h <= height and ps <= w <= width) or h % ps or w % ps]
        if bad:
            raise ValueError(
                f"image_sizes {sizes} disagree with pixel_values of {height}x{width} pixels: each (height, width) must be "
                f"a positive multiple of the patch size {ps} within the padded pixels (bad: {bad}); pass pixel_values "
                "and image_sizes from the same processor call"
            )
