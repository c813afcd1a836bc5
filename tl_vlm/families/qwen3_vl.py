"""Qwen3-VL: the Qwen2-VL family (``families/qwen2_vl.py``) with a Qwen3 language model and DeepStack.

What differs from Qwen2-VL, each in its own place:
- Vision (``towers/qwen3_vision.py``): learned positions resampled to each grid, patch-embedding bias, GELU(tanh).
- DeepStack (``towers/deepstack.py``): the outputs of vision blocks ``deepstack_visual_indexes[k]`` go through
  merger ``projector.deepstack.{k}`` and are added to the output of language block ``k`` at the visual
  positions (``blocks.{k}.hook_deepstack``), an extra residual component that decompositions count.
- Language: Qwen3 (QK-norm ``attn.q_norm|k_norm``, no q/k/v biases, ``head_dim`` from the config) with
  interleaved M-RoPE (``components/mrope.InterleavedMultimodalRotary``).
- Videos: the processor writes each temporal patch as its own ``<t seconds><|vision_start|>`` run of
  ``<|video_pad|>`` ``<|vision_end|>``, so placeholders are checked per frame; HF's ``get_rope_index`` gives
  every frame its own block of positions (hf_compat).
- Qwen3-VL-MoE (``HookedQwen3VLMoe``): the same, with mixture-of-experts MLPs in the LM's sparse blocks
  (``components/moe.py``: router logits, chosen experts and weights, each expert's weights and output hooked).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

from tl_vlm.components import KVCache
from tl_vlm.components.axial_rotary import AxialRotary
from tl_vlm.components.mrope import InterleavedMultimodalRotary
from tl_vlm.config import TowerConfig
from tl_vlm.components.moe import MoEConfig
from tl_vlm.convert.hf_modules import ModuleRule
from tl_vlm.convert.moe import qwen_moe_config, qwen_moe_rules
from tl_vlm.convert.rules import Rule, WeightMap, linear_rules, norm_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.convert.vits import qwen3_vit_config, qwen3_vit_rules
from tl_vlm.families.qwen2_vl import HookedQwen2VL, QwenVLConfig, _checked, interleave
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers.deepstack import DeepStackLM, DeepStackProjector
from tl_vlm.towers.qwen3_vision import Qwen3VisionTower


@dataclass
class Qwen3VLConfig(QwenVLConfig):
    deepstack_layers: tuple[int, ...]  # vision blocks whose outputs feed DeepStack (HF's deepstack_visual_indexes)
    n_positions: int  # learned vision positions (a square table)


def qwen3_language_config(hf_config) -> TowerConfig:
    """The Qwen3 LM of a Qwen3-VL checkpoint: GQA, QK-norm, RMSNorm, gated SiLU MLP, interleaved M-RoPE."""
    tc = hf_config.text_config
    deepstack = len(hf_config.vision_config.deepstack_visual_indexes)
    if deepstack >= tc.num_hidden_layers:
        raise NotImplementedError(
            f"{deepstack} DeepStack layers into a {tc.num_hidden_layers}-layer language model (features would enter "
            "after the last block); tl_vlm supports fewer DeepStack layers than language blocks, as every checkpoint has"
        )
    cfg = decoder_lm_config(
        tc,
        getattr(hf_config, "_name_or_path", ""),
        attn_biases=("q", "k", "v", "o") if tc.attention_bias else (),
        head_dim=tc.head_dim,
        tie=bool(hf_config.tie_word_embeddings),
        qk_norm=True,
    )
    return cfg.replace(deepstack_layers=deepstack)


class HookedQwen3VL(HookedQwen2VL):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    hf_class = Qwen3VLModel
    vlm_cfg: Qwen3VLConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def hf_module_rules(cls, cfg) -> list[ModuleRule]:
        """Qwen2-VL's names, without ``merger.ln_q``: Qwen3-VL's merger norm has another name and place."""
        return [rule for rule in super().hf_module_rules(cfg) if not rule.hf.endswith("merger.ln_q")]

    @classmethod
    def config_from_hf(cls, hf_config) -> Qwen3VLConfig:
        vc = hf_config.vision_config
        if vc.num_position_embeddings != int(vc.num_position_embeddings**0.5) ** 2:
            raise NotImplementedError(f"num_position_embeddings={vc.num_position_embeddings} is not a square grid")
        return Qwen3VLConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=qwen3_language_config(hf_config),
            vision=qwen3_vit_config(vc),
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
            video_token_id=hf_config.video_token_id,
            geometry=cls.geometry(vc),
            projector_width=vc.out_hidden_size,
            deepstack_layers=tuple(vc.deepstack_visual_indexes),
            n_positions=vc.num_position_embeddings,
        )

    @classmethod
    def weight_map(cls, cfg: Qwen3VLConfig) -> WeightMap:
        return WeightMap(cls.rules(cfg))

    @classmethod
    def rules(cls, cfg: Qwen3VLConfig) -> list[Rule]:
        mergers = [(r"visual\.merger", "projector")] + [
            (rf"visual\.deepstack_merger_list\.{k}", f"projector.deepstack.{k}") for k in range(len(cfg.deepstack_layers))
        ]
        return [
            *qwen3_vit_rules(r"visual", "vision", cfg.vision),
            *[rule for hf, tl in mergers for rule in (
                *norm_rules(rf"{hf}\.norm", f"{tl}.ln"),
                *linear_rules(rf"{hf}\.linear_fc1", f"{tl}.mlp.W_in", f"{tl}.mlp.b_in"),
                *linear_rules(rf"{hf}\.linear_fc2", f"{tl}.mlp.W_out", f"{tl}.mlp.b_out"),
            )],
            *decoder_lm_rules(r"language_model", cfg.language),
        ]

    def moe(self) -> MoEConfig | None:
        """The language model's mixture-of-experts blocks (Qwen3-VL-MoE); None: every MLP is dense."""
        return None

    def build(self) -> None:
        cfg = self.vlm_cfg
        rotary = InterleavedMultimodalRotary.from_hf_config(cfg.language.hf_config)
        self.attach_language(DeepStackLM(cfg.language, rotary, self.moe()))
        rotary = AxialRotary.from_hf_config(cfg.hf_config.vision_config, cfg.vision.d_head)
        self.vision = Qwen3VisionTower(cfg.vision, cfg.geometry, rotary, cfg.n_positions, cfg.deepstack_layers)
        self.projector = DeepStackProjector(
            cfg.vision.d_model, cfg.projector_width, cfg.geometry.merge_size, cfg.vision.normalization_type,
            len(cfg.deepstack_layers),
        )

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        return self._encode(inputs.pixel_values, inputs.image_grid_thw)[0]

    def _encode(
        self, pixel_values: Tensor, grid_thw: Tensor
    ) -> tuple[Float[Tensor, "tokens d_model"], list[Float[Tensor, "tokens d_model"]]]:
        """One vision run over all visual inputs: main features and DeepStack features, tokens in row order."""
        hidden, patches, stack = self.vision(pixel_values, grid_thw)
        real = patches.valid[:, :: self.vlm_cfg.geometry.merge_size**2]
        deepstack = [merger(h)[real] for merger, h in zip(self.projector.deepstack, stack)]
        return self.projector(hidden)[real], deepstack

    def run_vlm(self, inputs: VLMInputs, position_ids: Tensor | None, cache: KVCache | None, stop_at_layer: int | None,
                logits_to_keep: int, generated_from: int | None) -> Tensor:
        ids = inputs.input_ids
        image_mask, video_mask = self.placeholder_masks(ids, generated_from)
        visual = image_mask | video_mask
        encoded = self._visual_features(inputs, image_mask, video_mask)
        features, deepstack = encoded if encoded is not None else (None, None)
        embeds = self.language.embed_inputs(ids, features, visual if features is not None else None)
        position_ids = self.prompt_positions(inputs, position_ids, cache)
        return self.language(
            embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep, visual, deepstack
        )

    def _visual_features(
        self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"], video_mask: Bool[Tensor, "batch pos"]
    ) -> tuple[Tensor, list[Tensor]] | None:
        """Main and DeepStack features in placeholder order (images and videos interleaved), or None."""
        present = self._checked_visuals(inputs, image_mask, video_mask)
        if not present:
            return None
        # One vision run for all images and videos, so every hook fires once per forward pass.
        features, deepstack = self._encode(torch.cat([p for p, _ in present]), torch.cat([g for _, g in present]))
        if len(present) == 1:
            return features, deepstack
        return interleave(features, image_mask, video_mask), [interleave(d, image_mask, video_mask) for d in deepstack]

    def _checked_videos(self, inputs: VLMInputs, video_mask: Bool[Tensor, "batch pos"]) -> tuple[Tensor, Tensor] | None:
        """(pixels, grid) of the videos, checked against their placeholders: one run per frame."""
        merge = self.vlm_cfg.geometry.merge_size
        video = _checked(inputs.pixel_values_videos, _frames(inputs.video_grid_thw), video_mask, "video frame", merge)
        return None if video is None else (video[0], inputs.video_grid_thw.to(video[0].device))


def _frames(grid: Tensor | None) -> Tensor | None:
    """One (1, h, w) row per temporal patch of each video: Qwen3-VL's prompt has one placeholder run per frame.
    A malformed grid is passed on unchanged for ``_checked`` to refuse."""
    if grid is None or grid.ndim != 2 or grid.shape[1] != 3 or bool((grid <= 0).any()):
        return grid
    frames = grid.repeat_interleave(grid[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


@dataclass
class Qwen3VLMoeConfig(Qwen3VLConfig):
    moe: MoEConfig


class HookedQwen3VLMoe(HookedQwen3VL):
    """Qwen3-VL-MoE: Qwen3-VL with mixture-of-experts MLPs in the language model's sparse blocks
    (``components/moe.py``: ``blocks.{i}.mlp.hook_router_logits``, ``mlp.experts.{e}.hook_out``)."""

    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    hf_class = Qwen3VLMoeModel
    vlm_cfg: Qwen3VLMoeConfig

    @classmethod
    def config_from_hf(cls, hf_config) -> Qwen3VLMoeConfig:
        dense = super().config_from_hf(hf_config)
        return Qwen3VLMoeConfig(**{f.name: getattr(dense, f.name) for f in fields(dense)},
                                moe=qwen_moe_config(hf_config.text_config))

    @classmethod
    def rules(cls, cfg: Qwen3VLMoeConfig) -> list[Rule]:
        return [*super().rules(cfg), *qwen_moe_rules(r"language_model", cfg.moe)]

    def moe(self) -> MoEConfig:
        return self.vlm_cfg.moe
