"""InternVL (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints): InternViT -> pixel shuffle -> LayerNorm +
MLP -> Qwen2 / Qwen2.5 / Qwen3 (or Llama) LM.

How image features enter the language stream (HF's order): the processor cuts each image into the tiles of the
best-fit grid of ``image_size`` tiles (``crop_to_patches``, 1..``max_patches`` tiles), row-major, plus a thumbnail
(the whole image resized) when there is more than one tile; ``pixel_values`` is all tiles of all images,
``[tile, 3, image_size, image_size]``. Each tile is one vision-tower row; its class token is dropped, its patch
grid pixel-shuffled (each 2x2 block of patches one token, ``towers/pixel_shuffle``) and projected. An image's
tiles fill the ``<IMG_CONTEXT>`` placeholders between its ``<img>`` and ``</img>`` delimiters, tile by tile.

Tiles are the image dimension of the vision hooks: ``vision.*`` and ``projector.*`` rows are tiles, in the
order above (image by image; within an image the crops row-major, then the thumbnail). ``model.tile_layout``
gives (image, tile of that image, thumbnail?) per row, and ``VLMInputs.row_images`` from ``prepare`` counts
tiles per prompt, so row splitting keeps each prompt's tiles. Images are told apart by their runs of
placeholders (the delimiters separate them).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass

from jaxtyping import Bool, Float
from torch import Tensor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import Rotary
from tl_vlm.config import ViTVLMConfig
from tl_vlm.convert.hf_modules import ModuleRule, decoder_lm_modules
from tl_vlm.convert.intern_vit import intern_vit_config, intern_vit_ignored, intern_vit_rules
from tl_vlm.convert.rules import WeightMap, linear_rules, norm_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.families.internvl_processor import InternVLImageTextProcessor
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM
from tl_vlm.towers.intern_vit import InternViTConfig, InternViTTower
from tl_vlm.towers.pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector, token_patches


@dataclass
class InternVLConfig(ViTVLMConfig):
    vision: InternViTConfig
    vision_feature_layer: int = -1
    scale: int = 2  # 1 / downsample_ratio: scale x scale patches per language token
    projector_act: str = "gelu"

    @property
    def feature_layer(self) -> int:
        """The vision feature layer as a non-negative hidden-state index (0 = input of block 0)."""
        return self.vision_feature_layer % (self.vision.n_layers + 1)

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.grid // self.scale) ** 2


class HookedInternVL(HookedVLM):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    fallback_processor = InternVLImageTextProcessor  # HF's needs torchvision (for its video processor)
    vlm_cfg: InternVLConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> InternVLConfig:
        if hf_config.vision_feature_select_strategy != "default":
            raise NotImplementedError("InternVL with the 'full' feature strategy (HF's pixel shuffle needs the class token dropped)")
        if not isinstance(hf_config.vision_feature_layer, int):
            raise NotImplementedError("InternVL with several vision feature layers")
        scale = round(1 / hf_config.downsample_ratio)
        if abs(scale * hf_config.downsample_ratio - 1) > 1e-9:
            raise NotImplementedError(f"InternVL with downsample_ratio {hf_config.downsample_ratio} (not 1 / an integer)")
        return InternVLConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=decoder_lm_config(hf_config.get_text_config(), getattr(hf_config, "_name_or_path", "")),
            vision=intern_vit_config(hf_config.vision_config),
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
            vision_feature_layer=hf_config.vision_feature_layer,
            scale=scale,
            projector_act=hf_config.projector_hidden_act,
        )

    @classmethod
    def load_processor(cls, path, trust_remote_code: bool):
        """HF's processor; without torchvision (``AutoProcessor`` raises a ValueError naming it, not an
        ImportError) tl_vlm's image-and-text processor from the same files, with a warning."""
        try:
            return super().load_processor(path, trust_remote_code)
        except ValueError as err:
            if "torchvision" not in str(err):
                raise
            warnings.warn(f"HF's processor for InternVL cannot load ({err}); using tl_vlm's {cls.fallback_processor.__name__}")
            return cls.fallback_processor.from_pretrained(path)

    legacy_module_prefixes = (
        ("model.language_model", "language_model.model"), ("model.vision_tower", "vision_tower"),
        ("model.multi_modal_projector", "multi_modal_projector"), ("lm_head", "language_model.lm_head"),
    )

    @classmethod
    def hf_module_rules(cls, cfg: InternVLConfig) -> list[ModuleRule]:
        # HF's attention and MLP modules output before the layer scale, which no hook point holds: not listed.
        layer, tl = "model.vision_tower.encoder.layer.{i}", "vision.blocks.{i}"
        return [
            ModuleRule(layer, f"{tl}.hook_resid_post", "vision"),
            ModuleRule(f"{layer}.layernorm_before", f"{tl}.ln1", "vision"),
            ModuleRule(f"{layer}.layernorm_after", f"{tl}.ln2", "vision"),
            *([ModuleRule("model.vision_tower.layernorm", "vision.ln_post")] if cfg.vision.ln_post else []),
            ModuleRule("model.multi_modal_projector.layer_norm", "projector.ln"),
            ModuleRule("model.multi_modal_projector", "projector.hook_out"),
            *decoder_lm_modules("model.language_model"),
            ModuleRule("lm_head", "unembed"),
        ]

    @classmethod
    def normalize_key(cls, key: str) -> str:
        # In memory (transformers 5) the parts sit under model.*; files nest the LM as language_model.model.*.
        key = re.sub(r"^model\.(?=language_model\.|vision_tower\.|multi_modal_projector\.)", "", key)
        key = re.sub(r"^language_model\.model\.", "language_model.", key)
        return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)

    @classmethod
    def weight_map(cls, cfg: InternVLConfig) -> WeightMap:
        return WeightMap(
            [
                *intern_vit_rules(r"vision_tower", "vision", cfg.vision),
                *norm_rules(r"multi_modal_projector\.layer_norm", "projector.ln"),
                *linear_rules(r"multi_modal_projector\.linear_1", "projector.mlp.W_in", "projector.mlp.b_in"),
                *linear_rules(r"multi_modal_projector\.linear_2", "projector.mlp.W_out", "projector.mlp.b_out"),
                *decoder_lm_rules(r"language_model", cfg.language),
            ],
            ignore=[*intern_vit_ignored(r"vision_tower")],
        )

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(DecoderLM(cfg.language, Rotary.from_hf_config(cfg.language.hf_config)))
        self.vision = InternViTTower(cfg.vision)
        d_text = cfg.language.d_model
        self.projector = PixelShuffleProjector(
            PixelShuffleConfig(d_vision=cfg.vision.d_model, scale=cfg.scale, d_out=d_text, d_hidden=d_text,
                               act_fn=cfg.projector_act, ln=True)
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(tiles=True, patches_per_token=self.vlm_cfg.scale**2)

    def hf_layers(self, hf_model) -> dict[str, list]:
        return {"language": list(hf_model.model.language_model.layers),
                "vision": list(hf_model.model.vision_tower.encoder.layer)}

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        cfg = self.vlm_cfg
        layer = cfg.feature_layer
        features = self.vision(inputs.pixel_values, keep=[layer])[layer]
        if layer == cfg.vision.n_layers and self.vision.ln_post is not None:  # HF's last_hidden_state
            features = self.vision.ln_post(features)
        return self.projector(features[:, 1:]).flatten(0, 1)

    def checked_image_features(self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"]) -> Tensor | None:
        if inputs.pixel_values is not None and inputs.pixel_values.ndim != 4:
            raise ValueError(
                f"InternVL pixel_values must be [tile, channel, height, width] (all tiles of all images), got "
                f"{tuple(inputs.pixel_values.shape)}; build them with the model's processor (model.prepare)"
            )
        if inputs.pixel_values is not None and image_mask.any():
            tiles = sum(self.tiles_per_image(image_mask))
            if tiles != inputs.pixel_values.shape[0]:
                raise ValueError(
                    f"input_ids hold image placeholders for {tiles} tiles ({self.vlm_cfg.tokens_per_tile} tokens each) "
                    f"but pixel_values holds {inputs.pixel_values.shape[0]} tiles; build prompt and images together "
                    "with the model's processor (model.prepare)"
                )
        return super().checked_image_features(inputs, image_mask)

    def tiles_per_image(self, image_mask: Bool[Tensor, "batch pos"]) -> list[int]:
        """Tiles of each image, from its run of placeholders (batch-major); a run that is not a whole number of
        tiles is an error."""
        per_tile = self.vlm_cfg.tokens_per_tile
        tiles = []
        for length in _runs(image_mask):
            if length % per_tile:
                raise ValueError(
                    f"a run of {length} image placeholders is not a whole number of tiles ({per_tile} tokens each); "
                    "build prompt and images together with the model's processor (model.prepare)"
                )
            tiles.append(length // per_tile)
        return tiles

    def tile_layout(self, inputs: VLMInputs) -> list[tuple[int, int, bool]]:
        """(image, tile of that image, is the thumbnail) for each vision-tower row."""
        layout = []
        for image, n in enumerate(self.tiles_per_image(self.image_token_mask(inputs.input_ids))):
            layout += [(image, tile, n > 1 and tile == n - 1) for tile in range(n)]
        return layout

    def prepare(self, images=None, text=None, **processor_kwargs) -> VLMInputs:
        """As HookedVLM's; ``row_images`` counts tiles per prompt (pixel_values' rows), so rows split with their tiles."""
        inputs = super().prepare(images=images, text=text, **processor_kwargs)
        if inputs.pixel_values is None:
            return inputs
        per_row = [sum(self.tiles_per_image(row[None])) for row in self.image_token_mask(inputs.input_ids)]
        return dataclasses.replace(inputs, row_images=tuple(per_row))

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per image token: its image, vision row (``tile``), tile of its image (``crop``, ``thumbnail``), the
        top-left patch it holds (``patch``, 1-based after the class token) and all of them (``patches``), its cell
        (``row``, ``col``) in the tile's token grid, and the pixel box of its patches in the original image
        (tile pixels when ``original_sizes`` is None)."""
        cfg = self.vlm_cfg
        grid, ps, side, scale = cfg.vision.grid, cfg.vision.patch_size, cfg.image_size, cfg.scale
        blocks = token_patches(grid, scale)
        cells, row = [], 0
        for image, n in enumerate(self.tiles_per_image(self.image_token_mask(inputs.input_ids))):
            columns = 1
            if original_sizes is not None and n > 1:
                w, h = original_sizes[image]
                columns, rows = self._tile_grid(h, w)
                if columns * rows + 1 != n:
                    raise ValueError(f"image {image} of size {w}x{h} gives {columns * rows + 1} tiles, not {n}; "
                                     "pass the original images in the order of the prompt")
            for tile in range(n):
                thumbnail = n > 1 and tile == n - 1
                if original_sizes is None:
                    geometry = lambda x, y: (float(x), float(y))  # noqa: E731  (tile pixels)
                elif thumbnail or n == 1:
                    w, h = original_sizes[image]
                    geometry = lambda x, y, w=w, h=h: (x * w / side, y * h / side)  # noqa: E731
                else:
                    w, h = original_sizes[image]
                    ty, tx = divmod(tile, columns)
                    sx, sy = columns * side / w, (n - 1) // columns * side / h
                    geometry = lambda x, y, tx=tx, ty=ty, sx=sx, sy=sy: ((tx * side + x) / sx, (ty * side + y) / sy)  # noqa: E731
                for t, patches in enumerate(blocks):
                    (r0, c0), (r1, c1) = patches[0], patches[-1]
                    x0, y0 = geometry(c0 * ps, r0 * ps)
                    x1, y1 = geometry((c1 + 1) * ps, (r1 + 1) * ps)
                    cells.append(dict(image=image, tile=row, crop=tile, thumbnail=thumbnail, patch=1 + r0 * grid + c0,
                                      patches=tuple(1 + r * grid + c for r, c in patches), row=t // (grid // scale),
                                      col=t % (grid // scale), kind="patch", x0=x0, y0=y0, x1=x1, y1=y1))
                row += 1
        return cells

    def _tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(columns, rows) of the crops the processor cuts an image of this size into (HF's choice)."""
        ip = self.processor.image_processor
        return get_optimal_tiled_canvas((height, width), (ip.size["height"], ip.size["width"]), ip.min_patches, ip.max_patches)


def _runs(mask: Bool[Tensor, "batch pos"]) -> list[int]:
    """Lengths of the runs of True in each row, batch-major."""
    lengths = []
    for row in mask:
        where = row.nonzero()[:, 0]
        if not len(where):
            continue
        breaks = ((where[1:] != where[:-1] + 1).nonzero()[:, 0] + 1).tolist()
        bounds = [0, *breaks, len(where)]
        lengths += [b - a for a, b in zip(bounds, bounds[1:])]
    return lengths
