"""LLaVA-NeXT / 1.6 (``LlavaNextForConditionalGeneration``): anyres tiles, unpadding and ``image_newline``."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from tl_vlm.capabilities import Capabilities
from tl_vlm.families.llava import LlavaFamily, has_class_token
from tl_vlm.families.weights import Rule
from tl_vlm.inputs import VLMInputs


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    input_fields = LlavaFamily.input_fields | {"image_sizes"}

    def capabilities(self, cfg) -> Capabilities:
        return Capabilities(tiles=True)

    def build_towers(self, model) -> None:
        super().build_towers(model)
        # Appended after each row of tiles; it lives with the projector whose output it joins.
        model.projector.image_newline = nn.Parameter(torch.empty(model.vlm_cfg.language.d_model))

    def extra_rules(self) -> list[Rule]:
        return [Rule(r"image_newline", "projector.image_newline")]

    def image_token_cells(self, model, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Runs HF's packing on (tile, patch) indices, so the order is HF's order by construction.
        Boxes: tile 0 is the whole image squashed to one tile; tiles 1.. cut the best-fit canvas."""
        cfg = model.vlm_cfg
        if cfg.vision_feature_select_strategy != "default" or not has_class_token(cfg.vision):
            raise NotImplementedError("spatial index for LLaVA-NeXT with the 'full' strategy or a SigLIP tower")
        hf_config = cfg.extra["hf_config"]
        side, grid = cfg.image_size, cfg.image_size // cfg.patch_size
        cells, first_tile = [], 0
        for image, (h, w) in enumerate(inputs.image_sizes.tolist()):
            n = image_size_to_num_patches((h, w), hf_config.image_grid_pinpoints, side)
            index = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(1, grid * grid + 1), indexing="ij"), -1).float()
            (packed,), _ = LlavaNextModel.pack_image_features(
                SimpleNamespace(config=hf_config), [index], inputs.image_sizes[image : image + 1],
                vision_feature_select_strategy="default", image_newline=torch.tensor([-1.0, -1.0]),
            )
            best_h, best_w = select_best_resolution((h, w), hf_config.image_grid_pinpoints)
            scale = min(best_w / w, best_h / h)
            pad_x, pad_y = (best_w - w * scale) / 2, (best_h - h * scale) / 2
            for tile, patch in packed.long().tolist():
                if tile < 0:
                    cells.append(dict(image=image, tile=-1, patch=-1, row=-1, col=-1, kind="newline"))
                    continue
                r, c = divmod(patch - 1, grid)
                x0, y0, x1, y1 = (c * cfg.patch_size, r * cfg.patch_size, (c + 1) * cfg.patch_size, (r + 1) * cfg.patch_size)
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

    def image_features(self, model, inputs: VLMInputs) -> Tensor:
        pixel_values, image_sizes = inputs.pixel_values, inputs.image_sizes
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them with pixel_values)")
        cfg = model.vlm_cfg
        hf_config = cfg.extra["hf_config"]
        n_tiles = [image_size_to_num_patches(size, hf_config.image_grid_pinpoints, cfg.image_size) for size in image_sizes]
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
        hidden = model.vision(pixel_values, keep=cfg.feature_layers)
        features = torch.split(model.projector(self.select_features(cfg, hidden)), n_tiles, dim=0)
        # HF's own packing (tile grid, unpadding, newline) so the token order is HF's by construction.
        packed, _ = LlavaNextModel.pack_image_features(
            SimpleNamespace(config=hf_config),
            features,
            image_sizes,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            image_newline=model.projector.image_newline,
        )
        return torch.cat(packed, dim=0)
