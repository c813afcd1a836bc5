"""Mistral Small 3.x (``Mistral3ForConditionalGeneration``): Pixtral ViT -> RMSNorm, 2x2 patch merger, MLP -> Mistral LM.

Everything but the projector is Pixtral-12B's (``families/pixtral.py``): native-resolution images, one padded
vision row per image, ``[IMG]`` rows ended by ``[IMG_BREAK]`` / ``[IMG_END]``. The processor resizes images to whole
2x2 merge blocks (``patch_size * spatial_merge_size`` pixels); each ``[IMG]`` stands for one block
(``towers/mistral3_projector.py``), and its spatial cell covers that block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.components import param_layout as layout
from tl_vlm.convert.rules import Rule, norm_rules
from tl_vlm.families.pixtral import HookedPixtral, PixtralConfig
from tl_vlm.towers.mistral3_projector import Mistral3Projector
from tl_vlm.towers.pixtral_vision import PatchLayout


@dataclass
class Mistral3Config(PixtralConfig):
    projector_eps: float = 1e-5  # the projector's RMSNorm uses the language model's eps


class HookedMistral3(HookedPixtral):
    family = "mistral3"
    architectures = ("Mistral3ForConditionalGeneration",)
    vision_model_types = ()
    vlm_cfg: Mistral3Config

    @classmethod
    def config_from_hf(cls, hf_config) -> Mistral3Config:
        if not isinstance(hf_config.vision_feature_layer, int):
            # HF's projector norms and merges d_vision-wide features: several feature layers cannot run there either.
            raise NotImplementedError("Mistral3 with several vision_feature_layer (HF's projector takes one)")
        return Mistral3Config(
            **cls.config_fields(hf_config), merge_size=hf_config.spatial_merge_size,
            projector_eps=hf_config.get_text_config().rms_norm_eps,
        )

    @classmethod
    def projector_rules(cls, cfg: PixtralConfig) -> list[Rule]:
        return [
            *norm_rules(r"multi_modal_projector\.norm", "projector.ln"),
            Rule(r"multi_modal_projector\.patch_merger\.merging_layer\.weight", "projector.W_merge", layout.transposed),
            *super().projector_rules(cfg),
        ]

    def build_projector(self) -> None:
        cfg = self.vlm_cfg
        self.projector = Mistral3Projector(
            cfg.vision.d_model, cfg.language.d_model, cfg.merge_size, cfg.projector_act, cfg.projector_bias,
            cfg.projector_eps,
        )

    def project(self, features: Float[Tensor, "image patch d_vision"], layout: PatchLayout) -> Float[Tensor, "image token d_model"]:
        return self.projector(features, layout.grids)

    def real_tokens(self, layout: PatchLayout) -> Bool[Tensor, "image token"]:
        m = self.vlm_cfg.merge_size
        tokens = torch.tensor([(h // m) * (w // m) for h, w in layout.grids], device=layout.valid.device)
        return torch.arange(int(tokens.max()), device=tokens.device) < tokens[:, None]
