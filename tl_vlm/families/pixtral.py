"""Pixtral-12B (``LlavaForConditionalGeneration`` with a ``pixtral`` vision config): native-resolution ViT ->
MLP projector -> Mistral LM.

Each image keeps its aspect ratio (the processor resizes its longest edge to at most ``max_image_size`` and rounds
both sides up to whole patches); the vision tower runs every image of a batch at once, one padded row per image,
no image attending to another (``towers/pixtral_vision.py``). The processor writes each image as rows of ``[IMG]``
placeholders, one per patch (per 2x2 merge block in Mistral3), each row ended by ``[IMG_BREAK]`` and the last by
``[IMG_END]``. The row tokens are ordinary text tokens (``hook_text_embed``); image features replace only the
``[IMG]`` placeholders, in image order and raster order within an image (HookedVLM's default forward). The
placeholder rows are checked against ``image_sizes``, so a prompt built without the processor cannot silently put
patches in the wrong rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import Rotary
from tl_vlm.components.pixtral_rotary import PixtralRotary
from tl_vlm.config import PixtralViTConfig, VLMConfig
from tl_vlm.convert.hf_modules import ModuleRule, decoder_lm_modules
from tl_vlm.convert.pixtral_vit import pixtral_vit_config, pixtral_vit_rules
from tl_vlm.convert.rules import WeightMap
from tl_vlm.convert.text_lms import decoder_lm_rules
from tl_vlm.families.llava import HookedLlava, LlavaConfig
from tl_vlm.families.pixtral_processor import PixtralImageTextProcessor
from tl_vlm.families.qwen2_vl import placeholder_runs
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM
from tl_vlm.towers.pixtral_vision import PatchLayout, PixtralVisionTower


@dataclass
class PixtralConfig(VLMConfig):
    vision: PixtralViTConfig
    vision_feature_layer: int | list[int] = -1
    projector_act: str = "gelu"
    projector_bias: bool = True
    merge_size: int = 1  # patches a side behind one language token (Mistral3's patch merger: 2)

    feature_layers = LlavaConfig.feature_layers  # read from vision_feature_layer and the tower's depth, as LLaVA's

    @property
    def token_size(self) -> int:
        """Pixels a side of the square one language token covers."""
        return self.vision.patch_size * self.merge_size


class HookedPixtral(HookedLlava):
    family = "pixtral"
    architectures = ("LlavaForConditionalGeneration",)
    vision_model_types = ("pixtral",)
    input_fields = HookedLlava.input_fields | {"image_sizes"}
    fallback_processor = PixtralImageTextProcessor  # HF's PixtralProcessor needs torchvision
    vlm_cfg: PixtralConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def hf_module_rules(cls, cfg) -> list[ModuleRule]:
        """The language model's modules; HF's Pixtral vision tower and projector run on the images packed into one
        sequence (tl_vlm: one row per image), so their names are not mapped."""
        return [*decoder_lm_modules("model.language_model"), ModuleRule("lm_head", "unembed")]

    @classmethod
    def config_fields(cls, hf_config) -> dict:
        return dict(cls.language_and_projector_fields(hf_config), vision=pixtral_vit_config(hf_config.vision_config))

    @classmethod
    def config_from_hf(cls, hf_config) -> PixtralConfig:
        if hf_config.vision_feature_select_strategy != "full":
            # HF's "default" would drop the first patch of the first image of the packed sequence only.
            raise NotImplementedError(
                f"Pixtral with vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}; "
                "Pixtral-12B uses 'full'"
            )
        return PixtralConfig(**cls.config_fields(hf_config))

    @classmethod
    def weight_map(cls, cfg: PixtralConfig) -> WeightMap:
        return WeightMap(
            [*pixtral_vit_rules(r"vision_tower", "vision", cfg.vision), *cls.projector_rules(cfg),
             *decoder_lm_rules(r"language_model", cfg.language)]
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(patches_per_token=self.vlm_cfg.merge_size**2, padded_vision_rows=True)

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(DecoderLM(cfg.language, Rotary.from_hf_config(cfg.language.hf_config)))
        self.vision = PixtralVisionTower(cfg.vision, PixtralRotary.from_hf_config(cfg.vision.hf_config))
        self.build_projector()

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        return {"language": list(hf_model.model.language_model.layers),
                "vision": list(hf_model.model.vision_tower.transformer.layers)}

    def align_hf_outputs(self, tower, outputs, inputs):
        """HF's vision blocks run all images as one packed sequence ([1, patches, d]): the valid patches of
        tl_vlm's padded rows, in row order."""
        if tower != "vision":
            return outputs, None
        return [out[0] for out in outputs], self.vision.patch_layout(inputs.image_sizes).valid

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        if inputs.image_sizes is None:
            raise ValueError("Pixtral needs image_sizes, the (height, width) of each image (the processor returns them "
                             "with pixel_values)")
        sizes = inputs.image_sizes.to(inputs.pixel_values.device)
        self.vision.check(inputs.pixel_values, sizes)
        for size in sizes.tolist():
            if size[0] % self.vlm_cfg.token_size or size[1] % self.vlm_cfg.token_size:
                raise ValueError(
                    f"image size {size} (height, width) is not a multiple of {self.vlm_cfg.token_size} pixels (patch "
                    f"size x merge size); the processor resizes images to whole tokens: use it (model.prepare)"
                )
        hidden, layout = self.vision(inputs.pixel_values, sizes, keep=self.vlm_cfg.feature_layers)
        features = [hidden[i] for i in self.vlm_cfg.feature_layers]
        projected = self.project(features[0] if len(features) == 1 else torch.cat(features, dim=-1), layout)
        return projected[self.real_tokens(layout).to(projected.device)]

    def project(self, features: Float[Tensor, "image patch d_in"], layout: PatchLayout) -> Float[Tensor, "image token d_model"]:
        """Projected features of each image's tokens (padded rows)."""
        return self.projector(features)

    def real_tokens(self, layout: PatchLayout) -> Bool[Tensor, "image token"]:
        """Which positions of the projector's token rows are real (one token per patch here)."""
        return layout.valid

    def padded_rows(self, inputs: VLMInputs, hook: str) -> Bool[Tensor, "row pos"] | None:
        if inputs.image_sizes is None:
            return None
        layout = self.vision.patch_layout(inputs.image_sizes)
        patch_rows = hook.startswith(("vision.", "projector.hook_in", "projector.ln."))
        return layout.valid if patch_rows else self.real_tokens(layout)

    def checked_image_features(self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"]) -> Tensor | None:
        features = super().checked_image_features(inputs, image_mask)
        if features is not None:
            side = self.vlm_cfg.token_size
            expected = [w // side for h, w in inputs.image_sizes.tolist() for _ in range(h // side)]
            runs = placeholder_runs(image_mask)
            if runs != expected:
                raise ValueError(
                    f"the image placeholders (id {self.vlm_cfg.image_token_id}) form runs of {runs} tokens but "
                    f"image_sizes give rows of {expected} tokens (each image row ended by [IMG_BREAK], the last by "
                    "[IMG_END]); build prompt and images together with the processor (model.prepare)"
                )
        return features

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per ``[IMG]`` placeholder, in order: its ``image`` (= vision-tower row ``tile``), the first vision
        ``patch`` it reads in that row (the top-left patch of its merge block) and all of them (``patches``), its
        (``row``, ``col``) among the image's token rows, and its pixel box ``x0, y0, x1, y1`` in the resized image, or in the original image when
        ``original_sizes`` (width, height per image) are given (the processor stretches each image to its size)."""
        cfg = self.vlm_cfg
        if inputs.image_sizes is None:
            raise ValueError("the spatial index needs the inputs' image_sizes (model.prepare returns them)")
        m, side, ps = cfg.merge_size, cfg.token_size, cfg.vision.patch_size
        cells = []
        for image, (h, w) in enumerate(inputs.image_sizes.tolist()):
            sx = sy = 1.0
            if original_sizes is not None:
                width, height = original_sizes[image]
                sx, sy = width / w, height / h
            for r in range(h // side):
                for c in range(w // side):
                    first = r * m * (w // ps) + c * m
                    cells.append(dict(
                        image=image, tile=image, patch=first, row=r, col=c, kind="patch",
                        x0=c * side * sx, y0=r * side * sy, x1=(c + 1) * side * sx, y1=(r + 1) * side * sy,
                        patches=[first + i * (w // ps) + j for i in range(m) for j in range(m)],
                    ))
        return cells

    def token_patches(self, cell) -> list[int]:
        """A token's merge block is a square of the image's raster-ordered patches, not consecutive ones."""
        return list(cell["patches"])
