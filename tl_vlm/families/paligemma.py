"""PaliGemma 1 / 2 (``PaliGemmaForConditionalGeneration``): SigLIP ViT (with its post-LN) -> linear -> Gemma
(PaliGemma 1) or Gemma 2 (PaliGemma 2) language model, a prefix LM.

The processor writes ``image_seq_length`` ``<image>`` tokens, BOS, the prompt and "\\n" (the prefix), then the
suffix (training targets). ``token_type_ids`` mark the suffix with 1: every prefix position sees the whole prefix,
later positions included; suffix positions attend causally. Positions count from 1, as HF's. Generated tokens are
suffix. HF silently falls back to a plain causal mask without ``token_type_ids`` (a different, wrong model); where
the prefix ends cannot be read from the tokens, so tl_vlm refuses such a run. The loss (``return_type="loss"``)
scores the suffix only, as HF's ``labels`` from the processor; ``model.prepare`` drops those labels (they are the
suffix ``token_type_ids`` mark) and takes ``suffix=``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.components import KVCache
from tl_vlm.config import ViTVLMConfig
from tl_vlm.convert.gemma_lms import GEMMA_NORMS, gemma_lm_modules, gemma_lm_config, gemma_lm_rules, gemma_rotaries
from tl_vlm.convert.rules import WeightMap, linear_rules
from tl_vlm.convert.llava_layout import LEGACY_MODULE_PREFIXES, llava_layout_key
from tl_vlm.convert.hf_modules import ModuleRule, vit_modules
from tl_vlm.convert.vits import vit_config, vit_ignored, vit_rules
from tl_vlm.families.llava import grid_cells, original_pixels, processed_pixels
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import LinearProjector, ViTTower
from tl_vlm.towers.gemma_lm import GemmaLM


@dataclass
class PaliGemmaVLMConfig(ViTVLMConfig):
    pass


class HookedPaliGemma(HookedVLM):
    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    input_fields = frozenset({"input_ids", "pixel_values", "attention_mask", "token_type_ids"})
    computed_parameters = GEMMA_NORMS
    legacy_module_prefixes = LEGACY_MODULE_PREFIXES
    vlm_cfg: PaliGemmaVLMConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> PaliGemmaVLMConfig:
        return PaliGemmaVLMConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=gemma_lm_config(hf_config.text_config, getattr(hf_config, "_name_or_path", ""), prefix_lm=True),
            vision=vit_config(hf_config.vision_config).replace(ln_post=True),  # HF reads SigLIP's last_hidden_state
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return llava_layout_key(key)

    @classmethod
    def hf_module_rules(cls, cfg) -> list[ModuleRule]:
        return [
            *vit_modules("model.vision_tower", "vision", cfg.vision),
            ModuleRule("model.multi_modal_projector", "projector.hook_out"),
            *gemma_lm_modules("model.language_model", cfg.language),
        ]

    @classmethod
    def weight_map(cls, cfg: PaliGemmaVLMConfig) -> WeightMap:
        return WeightMap(
            [
                *vit_rules(r"vision_tower", "vision", cfg.vision),
                *linear_rules(r"multi_modal_projector\.linear", "projector.W", "projector.b"),
                *gemma_lm_rules(r"language_model", cfg.language),
            ],
            ignore=[*vit_ignored(r"vision_tower"), r".*\.position_ids"],
        )

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(GemmaLM(cfg.language, *gemma_rotaries(cfg.language.hf_config), window_limits_blocks=False))
        self.vision = ViTTower(cfg.vision)
        self.projector = LinearProjector(cfg.vision.d_model, cfg.language.d_model)

    # ------------------------------------------------------------------ inputs

    def process(self, **kwargs):
        """HF's processor output without its ``labels``: they are ``input_ids`` on the suffix that ``token_type_ids``
        mark, which the loss reads from there."""
        batch = self.processor(**kwargs)
        batch.pop("labels", None)
        return batch

    def unscored_positions(self, inputs: VLMInputs) -> Bool[Tensor, "batch pos"]:
        """The loss scores the suffix only (HF's processor labels are -100 on the prefix)."""
        if inputs.token_type_ids is None:
            raise ValueError("PaliGemma's loss scores the suffix that token_type_ids mark; pass the processor's")
        return inputs.token_type_ids.to(inputs.input_ids.device) == 0

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        n = self.vlm_cfg.vision.n_layers
        return self.projector(self.vision.ln_post(self.vision(inputs.pixel_values, keep=[n])[n])).flatten(0, 1)

    def run_vlm(self, inputs, position_ids, cache, stop_at_layer, logits_to_keep, generated_from):
        embeds, image_mask = self.embed_prompt(inputs, generated_from)
        ids = inputs.input_ids
        if position_ids is None:  # HF: 1-based, whatever the padding
            past = cache.length if cache is not None else 0
            position_ids = torch.arange(past + 1, past + 1 + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        prefix = self.prefix_blocks(inputs, image_mask, cache, generated_from)
        return self.language(embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep, prefix)

    def prefix_blocks(
        self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"], cache: KVCache | None,
        generated_from: int | None,
    ) -> Int[Tensor, "batch pos"] | None:
        """0 on the prefix (one bidirectional block), -1 on the suffix, as HF's ``where(token_type_ids == 0, 0, -1)``;
        None in decode steps, which are suffix (HF passes no ids there)."""
        if cache is not None and cache.length > 0:
            return None
        types = inputs.token_type_ids
        if types is None:
            raise ValueError(
                "PaliGemma needs token_type_ids (0 on the image + prompt prefix, which attends bidirectionally, 1 on "
                "the suffix): without them HF silently runs a causal mask. Pass the processor's token_type_ids "
                "(model.prepare returns them), or zeros for a prompt without suffix"
            )
        types = prompt_token_types(types, image_mask, generated_from, generated_type=1)  # new tokens: suffix, as HF's
        return torch.where(types == 0, 0, -1)

    def prefill_positions(self, inputs: VLMInputs, mask: Tensor) -> Tensor:
        """HF's generate: positions from the attention mask, plus one (PaliGemma counts from 1)."""
        return super().prefill_positions(inputs, mask) + 1

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        cfg = self.vlm_cfg
        cells = []
        for image in range(inputs.pixel_values.shape[0]):
            geometry = processed_pixels if original_sizes is None else original_pixels(
                self.processor.image_processor, original_sizes[image])
            cells += grid_cells(cfg.vision, image, image, geometry, cls=False, first_patch=0)
        return cells


def prompt_token_types(
    types: Int[Tensor, "batch prompt"], image_mask: Bool[Tensor, "batch pos"], generated_from: int | None,
    generated_type: int,
) -> Int[Tensor, "batch pos"]:
    """The processor's ``token_type_ids`` on ``input_ids``' device, checked against them; in generation without a KV
    cache, extended by ``generated_type`` over the generated tokens (which come without types)."""
    if types.shape[-1] == generated_from:
        new = types.new_full((types.shape[0], image_mask.shape[-1] - types.shape[-1]), generated_type)
        types = torch.cat([types, new], -1)
    if types.shape != image_mask.shape:
        raise ValueError(
            f"token_type_ids have shape {tuple(types.shape)} but input_ids {tuple(image_mask.shape)}; pass the "
            "processor's token_type_ids with its input_ids (model.prepare)"
        )
    return types.to(image_mask.device)
