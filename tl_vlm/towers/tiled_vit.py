"""Mllama's tiled vision encoder as two towers: ``vision`` (the local layers) and ``vision_global`` (gated layers).

An image is up to ``max_num_tiles`` tiles of ``image_size`` pixels. Each tile is patchified, gets the gated
aspect-ratio embedding (``hook_tile_embed``), a class token and the gated tile-aware positions,
then ``ln_pre``; its positions are padded to a multiple of 8 with zeros (as HF). Both towers
run on one row per image with the tiles side by side:

    [image, tile * n_pos, d_model],  n_pos = ceil8(1 + patches): position t * n_pos + p is tile t, position p
    (p = 0 the class token, 1..patches the patches in row-major order, the rest padding)

which is HF's own layout: its "local" layers already attend across the tiles of an image (HF's mask only keeps
padding queries off padding keys; real positions see every tile, padding tiles and padding patches included), so
the two towers differ only by ``ln_post``, the second gated aspect-ratio embedding (``vision_global.hook_tile_embed``)
and the gates. Images are HF's ``batch * max_images`` slots, empty slots included (HF runs them too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import TransformerBlock, make_norm
from tl_vlm.components.gated_block import GatedBlock
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.tile_embeddings import AspectRatioEmbedding, TiledPositionEmbedding
from tl_vlm.config import ViTConfig
from tl_vlm.towers.stacked import StackedWeights

# HF's layernorm_pre / layernorm_post are nn.LayerNorm with its default eps, whatever the config's norm_eps.
_LN_EPS = 1e-5


@dataclass
class TiledViTConfig(ViTConfig):
    """A tiled ViT tower: tiles per image, aspect ratios, and which local layers' outputs the projector reads."""

    max_num_tiles: int = 4
    n_aspect_ratios: int = 8
    intermediate_layers: tuple[int, ...] = ()

    @property
    def n_positions(self) -> int:
        """Positions of one tile: the class token and the patches."""
        return self.grid**2 + 1

    @property
    def padded_positions(self) -> int:
        """Positions of one tile in the towers' rows (padded to a multiple of 8, as HF)."""
        return -(-self.n_positions // 8) * 8


def tile_mask(aspect_ratio_mask: Int[Tensor, "image tile"], cfg: TiledViTConfig, dtype: torch.dtype) -> Tensor:
    """HF's additive attention mask over a row ``[image, 1, tile * n_pos, tile * n_pos]``: 0 or the dtype's minimum,
    computed as HF does (so it rounds the same): only a padding query and a padding key together are masked."""
    n_images, n_tiles = aspect_ratio_mask.shape
    length, pad = cfg.padded_positions, cfg.padded_positions - cfg.n_positions
    real = aspect_ratio_mask.view(n_images, n_tiles, 1, 1).to(dtype).repeat(1, 1, length, 1)
    real[:, :, -pad:] = 0  # as HF's slice: with no padding (-0:) this masks every position
    padding = (1 - real).reshape(n_images, n_tiles * length, 1)
    return (padding @ padding.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


class TiledViTTower(StackedWeights, nn.Module):
    """The local layers: embeddings, ``ln_pre``, blocks, ``ln_post``."""

    def __init__(self, cfg: TiledViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.W_patch = nn.Parameter(torch.empty(d, cfg.num_channels, cfg.patch_size, cfg.patch_size))
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.tile_embed = AspectRatioEmbedding(cfg.n_aspect_ratios, cfg.max_num_tiles, d)
        self.pos_embed = TiledPositionEmbedding(cfg.n_aspect_ratios, cfg.max_num_tiles, cfg.n_positions, d)
        self.hook_embed = HookPoint()  # [image, tile, patch, d_model]: the patch embeddings
        self.hook_tile_embed = HookPoint()  # [image, tile, 1, d_model]: gated aspect-ratio vectors, added per tile
        self.ln_pre = make_norm("LN", d, _LN_EPS)
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.ln_post = make_norm("LN", d, _LN_EPS)

    def forward(
        self,
        pixel_values: Float[Tensor, "image tile channel height width"],
        aspect_ratio_ids: Int[Tensor, " image"],
        mask: Tensor,
    ) -> tuple[Float[Tensor, "image pos d_model"], dict[int, Float[Tensor, "image pos d_model"]]]:
        """The stream after ``ln_post`` and the outputs of the intermediate layers (by layer)."""
        cfg = self.cfg
        n_images, n_tiles = pixel_values.shape[:2]
        patches = F.conv2d(pixel_values.flatten(0, 1).to(self.W_patch.dtype), self.W_patch, stride=cfg.patch_size)
        x = run_hook(self.hook_embed, patches.flatten(2).transpose(1, 2).reshape(n_images, n_tiles, -1, cfg.d_model))
        x = x + run_hook(self.hook_tile_embed, self.tile_embed(aspect_ratio_ids))
        cls = self.class_embedding.expand(n_images, n_tiles, 1, cfg.d_model)
        x = self.pos_embed(torch.cat([cls, x], dim=2), aspect_ratio_ids)
        x = F.pad(self.ln_pre(x), (0, 0, 0, cfg.padded_positions - cfg.n_positions))
        resid = x.reshape(n_images, -1, cfg.d_model)
        kept = {}
        for i, block in enumerate(self.blocks):
            resid = block(resid, mask=mask)
            if i in cfg.intermediate_layers:
                kept[i] = resid
        return self.ln_post(resid), kept


class GlobalViTTower(StackedWeights, nn.Module):
    """The gated global layers after the second aspect-ratio embedding."""

    def __init__(self, cfg: TiledViTConfig):
        super().__init__()
        self.cfg = cfg
        self.tile_embed = AspectRatioEmbedding(cfg.n_aspect_ratios, cfg.max_num_tiles, cfg.d_model)
        self.hook_tile_embed = HookPoint()  # [image, tile, 1, d_model]
        self.blocks = nn.ModuleList([GatedBlock(cfg, i) for i in range(cfg.n_layers)])

    def forward(
        self, x: Float[Tensor, "image pos d_model"], aspect_ratio_ids: Int[Tensor, " image"], mask: Tensor
    ) -> Float[Tensor, "image pos d_model"]:
        cfg = self.cfg
        tiles = x.view(x.shape[0], cfg.max_num_tiles, cfg.padded_positions, cfg.d_model)
        resid = (tiles + run_hook(self.hook_tile_embed, self.tile_embed(aspect_ratio_ids))).view_as(x)
        for block in self.blocks:
            resid = block(resid, mask=mask)
        return resid
