"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP -> MLP projector -> Qwen2, with anyres_max
tiling, multi-image prompts and videos.

How the visual features enter the language stream (HF's order, reproduced here):

- an image alone in its prompt: the whole image squashed to one tile (``grid x grid`` patches), then its anyres
  tiles stitched into one patch grid, the processor's padding cropped off ("unpadding"), the grid bilinearly
  shrunk when it holds clearly more than ``max_tiles`` tiles' worth of patches (``vision_aspect_ratio``
  "anyres_max_9": ratio > 1.1), and ``image_newline`` after each row of the grid;
- an image in a multi-image prompt (``batch_num_images`` > 1): padded to a square, one tile, one ``image_newline``;
- a video: each frame one tile, its grid bilinearly pooled to ``ceil(grid / 2)`` squared, all frames, then one
  ``image_newline``.

All tiles and frames go through the vision tower in one run (image tiles first, then video frames), so every
hook fires once per forward pass; HF runs its tower once for the images and once for the videos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.families.llava_next import HookedLlavaNext, LlavaNextConfig
from tl_vlm.families.onevision_layout import anyres_layout, max_tiles, tiles_per_image
from tl_vlm.families.onevision_processor import OnevisionImageTextProcessor
from tl_vlm.hf_compat import llava_onevision_pack
from tl_vlm.inputs import VLMInputs


def pool_frames(features: Float[Tensor, "frame patch d"], grid: int) -> Float[Tensor, "frame pooled d"]:
    """HF's ``apply_pooling``: each frame's ``grid x grid`` features bilinearly resized to ``ceil(grid/2)`` a side."""
    frames, _, d = features.shape
    spatial = features.view(frames, grid, grid, d).permute(0, 3, 1, 2)
    pooled = F.interpolate(spatial, size=[math.ceil(grid / 2)] * 2, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, -1, d)


@dataclass
class LlavaOnevisionConfig(LlavaNextConfig):
    video_token_id: int = -1
    max_tiles: int = 9  # vision_aspect_ratio "anyres_max_9": larger tile grids are shrunk to about this many tiles


class HookedLlavaOnevision(HookedLlavaNext):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    input_fields = HookedLlavaNext.input_fields | {"batch_num_images", "pixel_values_videos"}
    fallback_processor = OnevisionImageTextProcessor  # HF's needs torchvision (for videos)
    vlm_cfg: LlavaOnevisionConfig

    @classmethod
    def config_from_hf(cls, hf_config) -> LlavaOnevisionConfig:
        cfg = LlavaOnevisionConfig(
            **cls.config_fields(hf_config), image_grid_pinpoints=hf_config.image_grid_pinpoints,
            video_token_id=hf_config.video_token_id, max_tiles=max_tiles(hf_config.vision_aspect_ratio),
        )
        if cfg.vision_feature_select_strategy != "full":
            raise NotImplementedError("LLaVA-OneVision with the 'default' feature strategy (HF's packing needs 'full')")
        return cfg

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(tiles=True, video=True)

    # ------------------------------------------------------------------ geometry

    def _geometry(self) -> tuple[list, int, int, int]:
        """(grid pinpoints, tile side in pixels, patches a side, anyres_max N)."""
        cfg = self.vlm_cfg
        return cfg.image_grid_pinpoints, cfg.image_size, cfg.vision.grid, cfg.max_tiles

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> Tensor:
        """Positions holding visual features: image and video placeholders."""
        cfg = self.vlm_cfg
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    # ------------------------------------------------------------------ running

    def visual_features(
        self, inputs: VLMInputs
    ) -> tuple[list[Float[Tensor, "token d_model"]], list[Float[Tensor, "token d_model"]]]:
        """Features of each image and of each video, from one vision-tower run (image tiles, then video frames)."""
        cfg = self.vlm_cfg
        pinpoints, tile, grid, _ = self._geometry()
        rows, n_tiles = [], []
        if inputs.pixel_values is not None:
            if inputs.image_sizes is None:
                raise ValueError("LLaVA-OneVision needs image_sizes (the processor returns them with pixel_values)")
            n_tiles = tiles_per_image(inputs.image_sizes, inputs.batch_num_images, pinpoints, tile)
            rows.append(self._image_rows(inputs.pixel_values, n_tiles))
        videos = inputs.pixel_values_videos
        if videos is not None:
            if videos.dim() != 5:
                raise ValueError(f"pixel_values_videos must be [video, frame, channel, height, width], got {tuple(videos.shape)}")
            rows.append(videos.flatten(0, 1))
        hidden = self.vision(torch.cat(rows), keep=cfg.feature_layers)
        projected = self.projector(self.select_features(hidden))
        newline = self.projector.image_newline
        images = []
        if n_tiles:
            per_image = list(torch.split(projected[: sum(n_tiles)], n_tiles))
            images = llava_onevision_pack(cfg.hf_config, per_image, inputs.image_sizes, newline)
        video_features = []
        if videos is not None:
            frames = projected[sum(n_tiles):].unflatten(0, videos.shape[:2])
            video_features = [torch.cat([pool_frames(v, grid).flatten(0, 1), newline[None].to(v)]) for v in frames]
        return images, video_features

    @staticmethod
    def _image_rows(pixel_values: Tensor, n_tiles: list[int]) -> Float[Tensor, "tile channel height width"]:
        if pixel_values.dim() == 5:  # [image, max tiles, c, h, w], zero-padded to the most tiles
            if pixel_values.shape[0] != len(n_tiles):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes gives {len(n_tiles)}; "
                    "pass both from the same processor call"
                )
            if pixel_values.shape[1] < max(n_tiles):
                raise ValueError(f"image_sizes imply up to {max(n_tiles)} tiles but pixel_values holds {pixel_values.shape[1]}")
            return torch.cat([tiles[:n] for tiles, n in zip(pixel_values, n_tiles)])
        if pixel_values.dim() != 4:
            raise ValueError(f"LLaVA-OneVision pixel_values must be 4D or 5D, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(n_tiles):
            raise ValueError(f"image_sizes imply {sum(n_tiles)} tiles but pixel_values holds {pixel_values.shape[0]}")
        return pixel_values

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_visual_tokens d_model"]:
        """Image and video features in the order of their placeholders in ``input_ids``."""
        images, videos = self.visual_features(inputs)
        return self._merge(inputs.input_ids, self.image_token_mask(inputs.input_ids), images, videos)

    def _merge(self, ids: Tensor, mask: Tensor, images: list[Tensor], videos: list[Tensor]) -> Tensor:
        """HF scatters image features over image placeholders and video features over video placeholders."""
        present = [torch.cat(f) for f in (images, videos) if f]
        if len(present) == 1:
            return present[0]
        is_image = (ids == self.vlm_cfg.image_token_id)[mask]
        merged = present[0].new_empty(is_image.shape[0], present[0].shape[-1])
        merged[is_image], merged[~is_image] = present[0], present[1]
        return merged

    def checked_image_features(self, inputs: VLMInputs, mask: Tensor) -> Tensor | None:
        """Visual features for the placeholders in ``mask`` (generated positions already cleared), after checking
        that pixels and placeholders of each kind come together and their counts agree."""
        ids, cfg = inputs.input_ids, self.vlm_cfg
        image_mask = mask & (ids == cfg.image_token_id)
        video_mask = mask & (ids == cfg.video_token_id)
        for pixels, kind_mask, kind, field in (
            (inputs.pixel_values, image_mask, "image", "pixel_values"),
            (inputs.pixel_values_videos, video_mask, "video", "pixel_values_videos"),
        ):
            n = int(kind_mask.sum())
            if pixels is None and n:
                raise ValueError(
                    f"input_ids hold {n} {kind} placeholder tokens but no {field} were given; pass the processor's "
                    f"{field} (model.prepare(...)) or drop the placeholders"
                )
            if pixels is not None and not n:
                raise ValueError(
                    f"{field} were given but input_ids hold no {kind} placeholder token, so the {kind} would be "
                    f"ignored; put the {kind} token in the prompt (model.prepare does this)"
                )
        if inputs.pixel_values is None and inputs.pixel_values_videos is None:
            return None
        images, videos = self.visual_features(inputs)
        for features, kind_mask, kind in ((images, image_mask, "image"), (videos, video_mask, "video")):
            given, wanted = sum(f.shape[0] for f in features), int(kind_mask.sum())
            if given != wanted:
                raise ValueError(
                    f"the {kind}s give {given} feature vectors ({[f.shape[0] for f in features]} per {kind}) but "
                    f"input_ids hold {wanted} {kind} placeholder tokens; build prompt and {kind}s together with the "
                    "model's processor (model.prepare)"
                )
        return self._merge(ids, mask, images, videos)

    # ------------------------------------------------------------------ verify

    def align_hf_outputs(self, tower, outputs, inputs):
        """HF runs the vision tower once for the image tiles and once for the video frames; tl_vlm runs both as
        one batch (tiles first)."""
        depth = self.vision.cfg.n_layers
        if tower != "vision" or len(outputs) != 2 * depth:
            return outputs, None
        return [torch.cat([outputs[i], outputs[depth + i]]) for i in range(depth)], None

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per visual placeholder, in order. ``kind``: "patch" (the token is vision patch ``patch`` of vision-tower
        row ``tile``, its (``row``, ``col``) in that tile's grid), "pooled" (anyres_max downsampling or video
        pooling blended several patches; ``tile``/``patch`` name the patch under the token's centre) or "newline"
        (no box). Images: tile 0 of each is the whole image; boxes are in original image pixels (``image_sizes``
        are the originals, so ``original_sizes`` adds nothing). Videos (``kind``
        "video" for pooled frame tokens, ``t`` the frame) come after all image tiles in the vision rows; their
        boxes are in processed frame pixels."""
        cfg = self.vlm_cfg
        pinpoints, tile, grid, _ = self._geometry()
        image_cells: list[dict] = []
        first_row = 0
        if inputs.pixel_values is not None:
            n_tiles = tiles_per_image(inputs.image_sizes, inputs.batch_num_images, pinpoints, tile)
            for image, ((h, w), n) in enumerate(zip(inputs.image_sizes.tolist(), n_tiles)):
                image_cells += self._image_cells(image, first_row, (h, w), n > 1)
                first_row += n
        video_cells: list[dict] = []
        if inputs.pixel_values_videos is not None:
            n_videos, n_frames = inputs.pixel_values_videos.shape[:2]
            for video in range(n_videos):
                video_cells += video_cells_of(cfg.patch_size, grid, video, first_row + video * n_frames, n_frames)
        ids = inputs.input_ids
        queues = {True: iter(image_cells), False: iter(video_cells)}
        return [next(queues[token == cfg.image_token_id]) for token in ids[self.image_token_mask(ids)].tolist()]

    def _image_cells(self, image: int, row: int, hw: tuple[int, int], tiled: bool) -> list[dict]:
        pinpoints, tile, grid, max_n = self._geometry()
        cfg = self.vlm_cfg
        h, w = hw
        ps = cfg.patch_size
        if not tiled:  # padded to a square of side max(h, w), then resized to the tile
            side = max(h, w)
            left, top = (side - w) // 2, (side - h) // 2
            to_image = lambda x, y: (x * side / tile - left, y * side / tile - top)
            base = tile_cells(image, row, grid, ps, to_image)
            return base + [newline_cell(image)]
        to_image = lambda x, y: (x * w / tile, y * h / tile)
        cells = tile_cells(image, row, grid, ps, to_image)
        layout = anyres_layout((h, w), pinpoints, tile, grid, max_n)
        best_h, best_w = layout.tiles_h * tile, layout.tiles_w * tile
        scale = min(best_w / w, best_h / h)
        pad_x, pad_y = (best_w - w * scale) / 2, (best_h - h * scale) / 2
        canvas = lambda x, y: ((x - pad_x) / scale, (y - pad_y) / scale)
        # Each packed token covers a (fractional, when downsampled) block of the unpadded patch grid.
        fy, fx = layout.height / layout.out_h, layout.width / layout.out_w
        for i in range(layout.out_h):
            for j in range(layout.out_w):
                r0, c0 = layout.top + i * fy, layout.left + j * fx
                r, c = int(r0 + fy / 2), int(c0 + fx / 2)  # the patch under the token's centre
                t = 1 + (r // grid) * layout.tiles_w + c // grid
                x0, y0 = canvas(c0 * ps, r0 * ps)
                x1, y1 = canvas((c0 + fx) * ps, (r0 + fy) * ps)
                cells.append(dict(image=image, tile=row + t, patch=(r % grid) * grid + c % grid, row=r % grid,
                                  col=c % grid, kind="pooled" if layout.downsampled else "patch",
                                  x0=x0, y0=y0, x1=x1, y1=y1))
            cells.append(newline_cell(image))
        return cells


def newline_cell(image: int) -> dict:
    return dict(image=image, tile=-1, patch=-1, row=-1, col=-1, kind="newline")


def tile_cells(image: int, row: int, grid: int, patch_size: int, to_image) -> list[dict]:
    """The ``grid x grid`` patches of vision-tower row ``row`` in patch order, boxes mapped by ``to_image``."""
    cells = []
    for r in range(grid):
        for c in range(grid):
            x0, y0 = to_image(c * patch_size, r * patch_size)
            x1, y1 = to_image((c + 1) * patch_size, (r + 1) * patch_size)
            cells.append(dict(image=image, tile=row, patch=r * grid + c, row=r, col=c, kind="patch",
                              x0=x0, y0=y0, x1=x1, y1=y1))
    return cells


def video_cells_of(patch_size: int, grid: int, video: int, first_row: int, n_frames: int) -> list[dict]:
    """Pooled tokens of each frame (``ceil(grid/2)`` a side, each a blend of about 2x2 patches), then a newline."""
    pooled = math.ceil(grid / 2)
    f = grid / pooled
    cells = []
    for t in range(n_frames):
        for i in range(pooled):
            for j in range(pooled):
                r, c = int((i + 0.5) * f), int((j + 0.5) * f)
                cells.append(dict(image=video, tile=first_row + t, patch=r * grid + c, row=r, col=c, kind="video", t=t,
                                  x0=j * f * patch_size, y0=i * f * patch_size, x1=(j + 1) * f * patch_size,
                                  y1=(i + 1) * f * patch_size))
    return cells + [newline_cell(video)]
