"""LLaVA-NeXT / 1.6 (``LlavaNextForConditionalGeneration``): anyres tiles, unpadding and ``image_newline``.

Each image is cut into a base tile (the whole image resized) plus the tiles of its best-fit resolution
(``image_grid_pinpoints``); every tile is one vision-tower row. HF's own packing (hf_compat) turns the tiles'
features into the image's token sequence, so the order is HF's by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from tl_vlm.capabilities import Capabilities
from tl_vlm.convert.rules import Rule
from tl_vlm.families.llava import HookedLlava, LlavaConfig
from tl_vlm.hf_compat import llava_next_pack
from tl_vlm.inputs import VLMInputs


@dataclass
class LlavaNextConfig(LlavaConfig):
    image_grid_pinpoints: list[list[int]] | None = None  # (height, width) resolutions the tiles may cover


class HookedLlavaNext(HookedLlava):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    input_fields = HookedLlava.input_fields | {"image_sizes"}
    crop_before_concat = False
    vlm_cfg: LlavaNextConfig

    @classmethod
    def config_from_hf(cls, hf_config) -> LlavaNextConfig:
        return LlavaNextConfig(**cls.config_fields(hf_config), image_grid_pinpoints=hf_config.image_grid_pinpoints)

    @classmethod
    def extra_rules(cls) -> list[Rule]:
        return [Rule(r"image_newline", "projector.image_newline")]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(tiles=True)

    def build(self) -> None:
        super().build()
        # Appended after each row of tiles; it lives with the projector whose output it joins.
        self.projector.image_newline = nn.Parameter(torch.empty(self.vlm_cfg.language.d_model))

    def tiles_per_image(self, image_sizes: Tensor) -> list[int]:
        cfg = self.vlm_cfg
        return [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.image_size) for size in image_sizes]

    def image_features(self, inputs: VLMInputs) -> Tensor:
        pixel_values, image_sizes = inputs.pixel_values, inputs.image_sizes
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them with pixel_values)")
        cfg = self.vlm_cfg
        n_tiles = self.tiles_per_image(image_sizes)
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(image_sizes):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes gives {len(image_sizes)}; "
                    "pass both from the same processor call"
                )
            pixel_values = torch.cat([tiles[:n] for tiles, n in zip(pixel_values, n_tiles)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"LLaVA-NeXT pixel_values must be 4D or 5D, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(n_tiles):
            raise ValueError(f"image_sizes imply {sum(n_tiles)} tiles but pixel_values holds {pixel_values.shape[0]}")
        hidden = self.vision(pixel_values, keep=cfg.feature_layers)
        features = torch.split(self.projector(self.select_features(hidden)), n_tiles, dim=0)
        packed = llava_next_pack(
            cfg.hf_config, features, image_sizes, cfg.vision_feature_select_strategy, self.projector.image_newline
        )
        return torch.cat(packed, dim=0)

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Runs HF's packing on (tile, patch) indices, so the order is HF's order by construction.
        Boxes: tile 0 is the whole image squashed to one tile; tiles 1.. cut the best-fit canvas."""
        cfg = self.vlm_cfg
        if cfg.vision_feature_select_strategy != "default" or not cfg.vision.class_token:
            raise NotImplementedError("spatial index for LLaVA-NeXT with the 'full' strategy or a SigLIP tower")
        side, grid = cfg.image_size, cfg.vision.grid
        cells, first_tile = [], 0
        for image, n in enumerate(self.tiles_per_image(inputs.image_sizes)):
            h, w = inputs.image_sizes[image].tolist()
            index = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(1, grid * grid + 1), indexing="ij"), -1).float()
            (packed,) = llava_next_pack(
                cfg.hf_config, [index], inputs.image_sizes[image : image + 1], "default", torch.tensor([-1.0, -1.0])
            )
            best_h, best_w = select_best_resolution((h, w), cfg.image_grid_pinpoints)
            scale = min(best_w / w, best_h / h)
            pad_x, pad_y = (best_w - w * scale) / 2, (best_h - h * scale) / 2
            for tile, patch in packed.long().tolist():
                if tile < 0:
                    cells.append(dict(image=image, tile=-1, patch=-1, row=-1, col=-1, kind="newline"))
                    continue
                r, c = divmod(patch - 1, grid)
                ps = cfg.patch_size
                x0, y0, x1, y1 = (c * ps, r * ps, (c + 1) * ps, (r + 1) * ps)
                if tile == 0:
                    box = (x0 * w / side, y0 * h / side, x1 * w / side, y1 * h / side)
                else:
                    ty, tx = divmod(tile - 1, best_w // side)
                    ox, oy = tx * side - pad_x, ty * side - pad_y
                    box = ((x0 + ox) / scale, (y0 + oy) / scale, (x1 + ox) / scale, (y1 + oy) / scale)
                cells.append(dict(image=image, tile=first_tile + tile, patch=patch, row=r, col=c, kind="patch",
                                  x0=box[0], y0=box[1], x1=box[2], y1=box[3]))
            first_tile += n
        return cells
