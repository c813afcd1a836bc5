"""LLaVA 1.5 (``LlavaForConditionalGeneration``): CLIP or SigLIP ViT -> MLP projector -> Llama / Mistral / Qwen2 LM.

The projector reads chosen hidden states of the vision tower (``vision_feature_layer``; several are
concatenated), without the class token under the "default" strategy; its outputs replace the ``<image>``
placeholders one patch per token (HookedVLM's default forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components import Rotary
from tl_vlm.config import ViTConfig, ViTVLMConfig
from tl_vlm.convert.llava_layout import LEGACY_MODULE_PREFIXES, llava_layout_key
from tl_vlm.convert.hf_modules import ModuleRule, decoder_lm_modules, vit_modules
from tl_vlm.convert.rules import Rule, WeightMap, linear_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.convert.vits import vit_config, vit_ignored, vit_rules
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM, MLPProjector, ViTTower
from tl_vlm.towers.projector import ProjectorConfig


@dataclass
class LlavaConfig(ViTVLMConfig):
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops the first token (CLIP's class token)
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def feature_layers(self) -> list[int]:
        """Vision feature layers as non-negative hidden-state indices (0 = input of block 0)."""
        layers = [self.vision_feature_layer] if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        return [layer % (self.vision.n_layers + 1) for layer in layers]


class HookedLlava(HookedVLM):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    # HF's LLaVA drops the first token of each feature layer, then concatenates; LLaVA-NeXT concatenates first.
    # Same values, but the projector's matmul reads a contiguous tensor or a strided view, and HF's kernel for
    # each rounds differently in half precision.
    crop_before_concat: ClassVar[bool] = True
    vlm_cfg: LlavaConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_fields(cls, hf_config) -> dict:
        """The LlavaConfig fields, for subclasses whose configs add to them."""
        return dict(
            cls.language_and_projector_fields(hf_config),
            vision=vit_config(hf_config.vision_config),
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        )

    @classmethod
    def language_and_projector_fields(cls, hf_config) -> dict:
        """The config fields every LLaVA-layout checkpoint has, whatever its vision tower (CLIP / SigLIP, Pixtral)."""
        image_token_id = getattr(hf_config, "image_token_id", None)
        return dict(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=decoder_lm_config(hf_config.get_text_config(), getattr(hf_config, "_name_or_path", "")),
            image_token_id=image_token_id if image_token_id is not None else hf_config.image_token_index,
            hf_config=hf_config,
            vision_feature_layer=hf_config.vision_feature_layer,
            projector_act=hf_config.projector_hidden_act,
            projector_bias=getattr(hf_config, "multimodal_projector_bias", True),
        )

    @classmethod
    def config_from_hf(cls, hf_config) -> LlavaConfig:
        return LlavaConfig(**cls.config_fields(hf_config))

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return llava_layout_key(key)

    legacy_module_prefixes = LEGACY_MODULE_PREFIXES

    @classmethod
    def hf_module_rules(cls, cfg: LlavaConfig) -> list[ModuleRule]:
        return [
            *vit_modules("model.vision_tower", "vision", cfg.vision),
            ModuleRule("model.multi_modal_projector", "projector.hook_out"),
            *decoder_lm_modules("model.language_model"),
            ModuleRule("lm_head", "unembed"),
        ]

    @classmethod
    def weight_map(cls, cfg: LlavaConfig) -> WeightMap:
        return WeightMap(
            [
                *vit_rules(r"vision_tower", "vision", cfg.vision),
                *cls.projector_rules(cfg),
                *decoder_lm_rules(r"language_model", cfg.language),
                *cls.extra_rules(),
            ],
            ignore=[*vit_ignored(r"vision_tower"), r".*\.position_ids"],
        )

    @classmethod
    def projector_rules(cls, cfg: LlavaConfig) -> list[Rule]:
        bias = cfg.projector_bias
        return [
            *linear_rules(r"multi_modal_projector\.linear_1", "projector.mlp.W_in", "projector.mlp.b_in" if bias else None),
            *linear_rules(r"multi_modal_projector\.linear_2", "projector.mlp.W_out", "projector.mlp.b_out" if bias else None),
        ]

    @classmethod
    def extra_rules(cls) -> list[Rule]:
        """Weights a LLaVA variant adds (LLaVA-NeXT's ``image_newline``)."""
        return []

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(DecoderLM(cfg.language, Rotary.from_hf_config(cfg.language.hf_config)))
        self.vision = ViTTower(cfg.vision)
        self.build_projector()

    def build_projector(self) -> None:
        """The MLP projector over the concatenated feature layers."""
        cfg = self.vlm_cfg
        d_text = cfg.language.d_model
        self.projector = MLPProjector(
            ProjectorConfig(
                d_in=cfg.vision.d_model * len(cfg.feature_layers), d_hidden=d_text, d_out=d_text,
                act_fn=cfg.projector_act, bias=cfg.projector_bias,
            )
        )

    # ------------------------------------------------------------------ running

    def select_features(self, hidden: dict[int, Tensor]) -> Float[Tensor, "image patch d_in"]:
        """The projector's input from the vision tower's hidden states (by hidden-state index)."""
        cfg = self.vlm_cfg
        features = [hidden[i] for i in cfg.feature_layers]
        crop = cfg.vision_feature_select_strategy == "default"
        if crop and self.crop_before_concat:
            features = [f[:, 1:] for f in features]
        selected = features[0] if len(features) == 1 else torch.cat(features, dim=-1)
        return selected[:, 1:] if crop and not self.crop_before_concat else selected

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        hidden = self.vision(inputs.pixel_values, keep=self.vlm_cfg.feature_layers)
        return self.projector(self.select_features(hidden)).flatten(0, 1)

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        cfg = self.vlm_cfg
        cls = cfg.vision.class_token
        keep_cls = cls and cfg.vision_feature_select_strategy == "full"
        cells = []
        for image in range(inputs.pixel_values.shape[0]):
            geometry = processed_pixels if original_sizes is None else original_pixels(
                self.processor.image_processor, original_sizes[image])
            grid = grid_cells(cfg.vision, image, image, geometry, keep_cls, first_patch=int(cls))
            if not cls and cfg.vision_feature_select_strategy == "default":
                grid = grid[1:]  # HF's "default" drops the first token whatever it is: here a patch
            cells += grid
        return cells


def crop_geometry(processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x scale, y scale, left, top) of the preprocessing: CLIP's shortest edge resized then centre crop, or
    SigLIP's resize to a fixed height x width. Processed pixel (x, y) comes from original pixel
    ((x + left) / x scale, (y + top) / y scale)."""
    w, h = size
    if processor.size.get("shortest_edge"):
        sx = sy = processor.size["shortest_edge"] / min(w, h)
    else:
        sx, sy = processor.size["width"] / w, processor.size["height"] / h
    crop = processor.crop_size if processor.do_center_crop else {"height": h * sy, "width": w * sx}
    return sx, sy, (w * sx - crop["width"]) / 2, (h * sy - crop["height"]) / 2


def processed_pixels(x: float, y: float) -> tuple[float, float]:
    """A ``grid_cells`` geometry: boxes in the processed image's pixels."""
    return float(x), float(y)


def original_pixels(processor, size: tuple[int, int]) -> Callable[[float, float], tuple[float, float]]:
    """A ``grid_cells`` geometry: boxes in the pixels of the original image of ``size`` (``crop_geometry``)."""
    sx, sy, left, top = crop_geometry(processor, size)
    return lambda x, y: ((x + left) / sx, (y + top) / sy)


def grid_cells(cfg: ViTConfig, image: int, tile: int, geometry, cls: bool, first_patch: int = 1) -> list[dict]:
    """Cells of one vision-tower row (an image or a tile) in patch order, boxes mapped by ``geometry``; patch
    ``first_patch`` is the top-left one (1 after a class token)."""
    ps, grid = cfg.patch_size, cfg.grid
    cells = [dict(image=image, tile=tile, patch=0, row=-1, col=-1, kind="cls")] if cls else []
    for r in range(grid):
        for c in range(grid):
            x0, y0 = geometry(c * ps, r * ps)
            x1, y1 = geometry((c + 1) * ps, (r + 1) * ps)
            cells.append(dict(image=image, tile=tile, patch=first_patch + r * grid + c, row=r, col=c, kind="patch",
                              x0=x0, y0=y0, x1=x1, y1=y1))
    return cells
