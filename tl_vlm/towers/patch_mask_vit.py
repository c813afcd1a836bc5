"""SigLIP ViT over padded images (Idefics3 / SmolVLM's vision model, after NaViT): each image comes with a patch
mask, padded patches are masked as keys, and positions are bucketed to the image's real extent.

An image with ``h x w`` real patches (top-left, the rest padding) reads position ``bucket(i / h) * side +
bucket(j / w)`` at patch (i, j) of the ``side x side`` table, so a small image spreads over the whole table as a
full one does; padded patches read position 0. Rows are ``[image, patch, ...]`` over the full padded grid
(padded patches still run through the blocks, as in HF, and the pixel shuffle reads them); ``patch_mask`` holds
the last forward's mask, ``vision.hook_pos_embed`` the positions each image read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.components.hooks import active, run_hook
from tl_vlm.towers.vision import ViTTower


def bucketed_position_ids(patch_mask: Bool[Tensor, "image h w"], side: int) -> Int[Tensor, "image patch"]:
    """HF's ``Idefics3VisionEmbeddings`` position ids: fractional coordinates over the real patches, bucketed."""
    images, max_h, max_w = patch_mask.shape
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=patch_mask.device)
    n_h, n_w = patch_mask[:, :, 0].sum(1), patch_mask[:, 0, :].sum(1)
    rows = torch.arange(max_h, device=patch_mask.device, dtype=torch.float32)[None] * (1.0 / n_h)[:, None]
    cols = torch.arange(max_w, device=patch_mask.device, dtype=torch.float32)[None] * (1.0 / n_w)[:, None]
    rows = torch.bucketize(rows.clamp(max=1.0 - 1e-6), boundaries, right=True)
    cols = torch.bucketize(cols.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (rows[:, :, None] * side + cols[:, None, :]).reshape(images, -1)
    return torch.where(patch_mask.reshape(images, -1), ids, 0)


class PatchMaskViTTower(ViTTower):
    def forward(
        self, pixel_values: Float[Tensor, "image channel height width"], patch_mask: Bool[Tensor, "image h w"]
    ) -> Float[Tensor, "image patch d_model"]:
        """The last hidden state, before the family's ``ln_post``."""
        ps = self.cfg.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[-2] % ps or pixel_values.shape[-1] % ps:
            raise ValueError(
                f"vision tower expects pixel_values [image, channel, height, width] in whole {ps}-pixel patches, got "
                f"{tuple(pixel_values.shape)}; build them with the model's processor (model.prepare)"
            )
        self.patch_mask = patch_mask
        x = run_hook(self.hook_embed, self.embed(pixel_values))
        pos = F.embedding(bucketed_position_ids(patch_mask, self.cfg.grid), self.embed.W_pos)
        if active(self.hook_pos_embed):
            pos = run_hook(self.hook_pos_embed, pos)
        resid = x + pos
        keys = patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        mask = None if bool(keys.all()) else keys  # as HF, which drops an all-real mask
        for block in self.blocks:
            resid = block(resid, mask=mask)
        return resid
