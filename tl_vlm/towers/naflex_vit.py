"""SigLIP 2's NaFlex vision tower (``Siglip2VisionModel``): images at their own aspect ratio, as padded rows of
patches, with their attention pooling.

Inputs are the processor's ``pixel_values`` ``[image, patch, p * p * channel]`` (each image's ``h x w`` patches
row-major, then padding), ``pixel_attention_mask`` ``[image, patch]`` (1 real, 0 padding) and ``spatial_shapes``
``[image, 2]`` (each image's ``(h, w)``). The embedding is ``components/naflex_embed``: a linear patchifier plus the
position grid resized to each ``(h, w)``. Padded patches are masked as keys in every block and in the pooling head,
so they never reach a real patch or the image embedding; they still run through the blocks as queries (as in HF),
so every hidden state equals HF's at every position, padding included.

Rows are ``[image, patch, ...]`` over the padded length (TL's ``[batch, pos]``). Hooks as the SigLIP tower: ``vision.hook_embed`` (patch embeddings), ``vision.hook_pos_embed``
(the resized, padded positions ``[image, patch, d_model]``), ``vision.blocks.{i}.*``, ``vision.ln_post.*``,
``vision.head.*``, ``vision.hook_pooled``, ``vision.hook_embed_out``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.components.hooks import run_hook
from tl_vlm.components.naflex_embed import NaFlexPatchEmbed
from tl_vlm.config import ViTConfig
from tl_vlm.towers.pooled_vit import PooledViT


class NaFlexViT(PooledViT):
    def __init__(self, cfg: ViTConfig):
        """``cfg.grid`` is the side of the learned position grid (``cfg.n_ctx = grid ** 2`` positions)."""
        super().__init__(cfg, "map", None)
        # The ViT's conv patchifier, replaced in place: the same parameter names, HF's linear maths.
        self.embed = NaFlexPatchEmbed(cfg.d_model, cfg.patch_size, cfg.num_channels, cfg.grid)

    def forward(
        self,
        pixel_values: Float[Tensor, "image patch pixels"],
        pixel_attention_mask: Int[Tensor, "image patch"],
        spatial_shapes: Int[Tensor, "image 2"],
        keep: list[int],
    ) -> dict[int, Float[Tensor, "image patch d_model"]]:
        """Hidden states with the requested indices (0..n_layers), as HF's ``hidden_states``."""
        real = self.check_inputs(pixel_values, pixel_attention_mask, spatial_shapes)
        x = run_hook(self.hook_embed, self.embed(pixel_values))
        pos = run_hook(self.hook_pos_embed, self.embed.positions(spatial_shapes, pixel_values.shape[1]))
        resid = x + pos
        keys = real[:, None, None, :]
        mask = None if bool(keys.all()) else keys  # as HF, which drops an all-real mask
        out = {}
        for i, block in enumerate(self.blocks):
            resid = run_hook(block.hook_resid_pre, resid)
            if i in keep:
                out[i] = resid
            resid = block(resid, None, mask, resid_pre_hooked=True)
        if self.cfg.n_layers in keep:
            out[self.cfg.n_layers] = resid
        return out

    def encode(
        self,
        pixel_values: Float[Tensor, "image patch pixels"],
        pixel_attention_mask: Int[Tensor, "image patch"],
        spatial_shapes: Int[Tensor, "image 2"],
    ) -> Float[Tensor, "image d_model"]:
        """HF's ``pooler_output``: the attention-pooled image embedding over the real patches."""
        last = self(pixel_values, pixel_attention_mask, spatial_shapes, keep=[self.cfg.n_layers])[self.cfg.n_layers]
        normed = self.ln_post(last)
        real = pixel_attention_mask.bool()  # checked by the forward
        mask = None
        if not bool(real.all()):  # HF's pooling mask: 0 where real, the dtype's minimum at padding
            minimum = torch.finfo(normed.dtype).min
            mask = torch.zeros(real.shape, dtype=normed.dtype, device=normed.device).masked_fill(~real, minimum)[:, None]
        pooled = run_hook(self.hook_pooled, self.head(normed, mask))
        return run_hook(self.hook_embed_out, pooled)

    def check_inputs(
        self, pixel_values: Tensor, pixel_attention_mask: Tensor | None, spatial_shapes: Tensor | None
    ) -> Bool[Tensor, "image patch"]:
        """The real patches; a clear error for inputs that would be silently wrong."""
        pixels = self.cfg.num_channels * self.cfg.patch_size**2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != pixels:
            raise ValueError(
                f"the NaFlex vision tower takes pixel_values [image, patch, {pixels}] (flattened {self.cfg.patch_size}px "
                f"patches), got {tuple(pixel_values.shape)}; build them with the model's processor (model.prepare or "
                "model.image_inputs)"
            )
        if pixel_attention_mask is None or spatial_shapes is None:
            raise ValueError(
                "the NaFlex vision tower needs pixel_attention_mask [image, patch] and spatial_shapes [image, 2] with "
                "pixel_values (which patches are real, and each image's patch grid); pass all three as the processor "
                "returns them (model.prepare(images=, text=) or model.image_inputs(images))"
            )
        images, length = pixel_values.shape[:2]
        if pixel_attention_mask.shape != (images, length) or spatial_shapes.shape != (images, 2):
            raise ValueError(
                f"pixel_attention_mask {tuple(pixel_attention_mask.shape)} and spatial_shapes "
                f"{tuple(spatial_shapes.shape)} do not fit pixel_values {tuple(pixel_values.shape)} (expected "
                f"({images}, {length}) and ({images}, 2)); pass the processor's three tensors together"
            )
        if spatial_shapes.is_floating_point() or spatial_shapes.dtype == torch.bool:
            raise ValueError(
                f"spatial_shapes must hold integer patch counts (h, w) per image, got dtype {spatial_shapes.dtype}; pass "
                "the processor's tensor (torch.long)"
            )
        counts = spatial_shapes.prod(-1)
        if bool((spatial_shapes < 1).any()) or bool((counts > length).any()):
            bad = ((spatial_shapes < 1).any(-1) | (counts > length)).nonzero()[:, 0].tolist()
            raise ValueError(
                f"images {bad} have patch grids {spatial_shapes[bad].tolist()} that do not fit the {length} patches per "
                "image of pixel_values; resize with the processor, whose max_num_patches bounds h * w (e.g. "
                f"model.prepare(..., max_num_patches={length}))"
            )
        real = pixel_attention_mask.bool()
        prefix = torch.arange(length, device=real.device)[None] < counts[:, None].to(real.device)
        if not torch.equal(real, prefix):
            bad = (real != prefix).any(-1).nonzero()[:, 0].tolist()
            raise ValueError(
                f"pixel_attention_mask of images {bad} does not mark their first h * w patches (spatial_shapes) as real "
                "and the rest as padding; pass the processor's pixel_attention_mask and spatial_shapes unchanged"
            )
        return real


def naflex_cells(
    spatial_shapes: Int[Tensor, "image 2"], length: int, patch_size: int, original_sizes: list[tuple[int, int]] | None
) -> list[dict]:
    """The spatial index of padded patch rows: per image, its ``h x w`` patches row-major with pixel boxes in the
    processed image (resized to ``w * p`` by ``h * p``, no crop) or in the original one (``original_sizes``: (width,
    height) each), then its padded positions (``kind`` "padding", no box, so region masks never select them)."""
    cells = []
    for image, (h, w) in enumerate(spatial_shapes.tolist()):
        sx = sy = 1.0
        if original_sizes is not None:
            width, height = original_sizes[image]
            sx, sy = width / (w * patch_size), height / (h * patch_size)
        for r in range(h):
            for c in range(w):
                cells.append(dict(image=image, tile=image, patch=r * w + c, row=r, col=c, kind="patch",
                                  x0=c * patch_size * sx, y0=r * patch_size * sy,
                                  x1=(c + 1) * patch_size * sx, y1=(r + 1) * patch_size * sy))
        cells += [dict(image=image, tile=image, patch=p, row=-1, col=-1, kind="padding") for p in range(h * w, length)]
    return cells
