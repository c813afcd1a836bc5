"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP ViT (with its post-LN) -> average pool to
``mm_tokens_per_image`` -> Gemma RMSNorm -> linear -> Gemma 3 language model.

The processor writes ``<start_of_image>``, ``mm_tokens_per_image`` image soft tokens and ``<end_of_image>`` per
image; the soft tokens take the projected features (HookedVLM's placeholder merge); boi / eoi are plain tokens.
The tokens of one image attend to each other in both directions, including later tokens of the same image (HF's
``token_type_ids``: a run of 1s is one image), on global and sliding layers alike (sliding layers window them too).
Without ``token_type_ids`` HF falls back to a plain causal mask; tl_vlm then builds them from the image soft-token
positions, which is exactly what the processor returns (``token_type_ids == (input_ids == image_token_id)``).
Pan-and-scan crops (``do_pan_and_scan=True`` in HF's PIL image processor) are extra images, each with its own
boi / soft tokens / eoi; they run unchanged, but the spatial index maps each crop's tokens to the crop's pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache
from tl_vlm.config import ViTVLMConfig
from tl_vlm.convert.gemma_lms import GEMMA_NORMS, gemma_lm_modules, gemma_lm_config, gemma_lm_rules, gemma_norm_rules, gemma_rotaries
from tl_vlm.convert.rules import Rule, WeightMap
from tl_vlm.convert.llava_layout import LEGACY_MODULE_PREFIXES, llava_layout_key
from tl_vlm.convert.hf_modules import ModuleRule, vit_modules
from tl_vlm.convert.vits import vit_config, vit_ignored, vit_rules
from tl_vlm.families.llava import original_pixels, processed_pixels
from tl_vlm.families.paligemma import prompt_token_types
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import ViTTower
from tl_vlm.towers.gemma_lm import GemmaLM
from tl_vlm.towers.pooled_projector import PooledProjector


@dataclass
class Gemma3VLMConfig(ViTVLMConfig):
    mm_tokens_per_image: int = 256
    boi_token_id: int | None = None
    eoi_token_id: int | None = None

    @property
    def tokens_per_side(self) -> int:
        return int(self.mm_tokens_per_image**0.5)


class HookedGemma3(HookedVLM):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    input_fields = frozenset({"input_ids", "pixel_values", "attention_mask", "token_type_ids"})
    computed_parameters = GEMMA_NORMS
    legacy_module_prefixes = LEGACY_MODULE_PREFIXES
    vlm_cfg: Gemma3VLMConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> Gemma3VLMConfig:
        vision = vit_config(hf_config.vision_config).replace(ln_post=True)  # HF reads SigLIP's last_hidden_state
        tokens = hf_config.mm_tokens_per_image
        side = int(tokens**0.5)
        if side * side != tokens or vision.grid % side:
            raise NotImplementedError(
                f"mm_tokens_per_image={tokens} must be a square whose side divides the {vision.grid}x{vision.grid} patch grid"
            )
        return Gemma3VLMConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=gemma_lm_config(hf_config.text_config, getattr(hf_config, "_name_or_path", "")),
            vision=vision,
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
            mm_tokens_per_image=tokens,
            boi_token_id=hf_config.boi_token_id,
            eoi_token_id=hf_config.eoi_token_id,
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return llava_layout_key(key)

    @classmethod
    def hf_module_rules(cls, cfg) -> list[ModuleRule]:
        return [
            *vit_modules("model.vision_tower", "vision", cfg.vision),
            ModuleRule("model.multi_modal_projector.mm_soft_emb_norm", "projector.ln"),
            ModuleRule("model.multi_modal_projector", "projector.hook_out"),
            *gemma_lm_modules("model.language_model", cfg.language),
        ]

    @classmethod
    def weight_map(cls, cfg: Gemma3VLMConfig) -> WeightMap:
        return WeightMap(
            [
                *vit_rules(r"vision_tower", "vision", cfg.vision),
                *gemma_norm_rules(r"multi_modal_projector\.mm_soft_emb_norm", "projector.ln"),
                Rule(r"multi_modal_projector\.mm_input_projection_weight", "projector.W"),
                *gemma_lm_rules(r"language_model", cfg.language),
            ],
            ignore=[*vit_ignored(r"vision_tower"), r".*\.position_ids",
                    r".*rotary_emb\..*original_inv_freq"],
        )

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(GemmaLM(cfg.language, *gemma_rotaries(cfg.language.hf_config), window_limits_blocks=True))
        self.vision = ViTTower(cfg.vision)
        self.projector = PooledProjector(cfg.vision.d_model, cfg.language.d_model, cfg.vision.grid, cfg.tokens_per_side,
                                         cfg.vision.eps)

    @property
    def capabilities(self) -> Capabilities:
        kernel = self.vlm_cfg.vision.grid // self.vlm_cfg.tokens_per_side
        return Capabilities(patches_per_token=kernel * kernel)

    def prepare(self, images=None, text=None, **processor_kwargs) -> VLMInputs:
        """HookedVLM's ``prepare``; each row's images counted from its ``<start_of_image>`` tokens, since pan-and-scan
        (``do_pan_and_scan=True``) adds crops, each an image with its own boi / soft tokens / eoi."""
        inputs = super().prepare(images=images, text=text, **processor_kwargs)
        if inputs.pixel_values is None:
            return inputs
        counts = (inputs.input_ids == self.vlm_cfg.boi_token_id).sum(-1)
        return dataclasses.replace(inputs, row_images=tuple(counts.tolist()))

    def process(self, images=None, text=None, **kwargs):
        """HF's Gemma 3 processor takes images nested per prompt; a flat list is split by each prompt's
        ``<start_of_image>`` count (as LLaVA's processors read it)."""
        flat = isinstance(images, (list, tuple)) and len(images) > 0 and not isinstance(images[0], (list, tuple))
        if flat and isinstance(text, list):
            counts = [t.count(self.processor.image_token) for t in text]
            if sum(counts) == len(images):
                queue = iter(images)
                images = [[next(queue) for _ in range(n)] for n in counts]
        return self.processor(images=images, text=text, **kwargs)

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        n = self.vlm_cfg.vision.n_layers
        patches = self.vision.ln_post(self.vision(inputs.pixel_values, keep=[n])[n])
        return self.projector(patches).flatten(0, 1)

    def run_vlm(self, inputs, position_ids, cache, stop_at_layer, logits_to_keep, generated_from):
        embeds, image_mask = self.embed_prompt(inputs, generated_from)
        blocks = self.image_blocks(inputs, image_mask, cache, generated_from)
        return self.language(embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep, blocks)

    def image_blocks(
        self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"], cache: KVCache | None,
        generated_from: int | None,
    ) -> Int[Tensor, "batch pos"] | None:
        """One id per image run of ``token_type_ids`` (-1 elsewhere), as HF's ``get_block_sequence_ids_for_mask``;
        None in decode steps (HF passes no ids there) and for text without ids (HF's causal fallback is then right)."""
        if cache is not None and cache.length > 0:
            return None
        types = inputs.token_type_ids
        if types is None:
            if not bool(image_mask.any()):
                return None
            types = image_mask.long()
        else:
            types = prompt_token_types(types, image_mask, generated_from, generated_type=0)  # new tokens: text
        is_image = types == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per soft token: its image (a pan-and-scan crop counts as an image), (row, col) in the pooled
        ``tokens_per_side`` grid, the first vision patch it averages, and its pixel box."""
        cfg = self.vlm_cfg
        n_images = inputs.pixel_values.shape[0]
        if original_sizes is not None and len(original_sizes) != n_images:
            raise ValueError(
                f"{len(original_sizes)} original images for {n_images} vision-tower images (pan-and-scan crops are "
                "images of their own); call without the original images to get boxes in processed pixels"
            )
        side, grid, ps = cfg.tokens_per_side, cfg.vision.grid, cfg.vision.patch_size
        kernel = grid // side
        cells = []
        for image in range(n_images):
            geometry = processed_pixels if original_sizes is None else original_pixels(
                self.processor.image_processor, original_sizes[image])
            for r in range(side):
                for c in range(side):
                    x0, y0 = geometry(c * kernel * ps, r * kernel * ps)
                    x1, y1 = geometry((c + 1) * kernel * ps, (r + 1) * kernel * ps)
                    cells.append(dict(image=image, tile=image, patch=r * kernel * grid + c * kernel, row=r, col=c,
                                      kind="patch", x0=x0, y0=y0, x1=x1, y1=y1))
        return cells
