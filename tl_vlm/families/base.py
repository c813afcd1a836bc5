"""What a model family provides, and the default behaviour of placeholder-token VLMs (LLaVA style).

A family turns an HF config into tower configs, builds the towers on a HookedVLM, maps checkpoint
keys to TL names, and runs the VLM-specific part of the forward pass: image features, merging them
into the language stream, position ids. Adding a family means one new file here (and a line in
``families/__init__.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache, Rotary
from tl_vlm.config import VLMConfig
from tl_vlm.families.weights import WeightMap
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM

if TYPE_CHECKING:
    from tl_vlm.hooked_vlm import HookedVLM


class Family:
    name: str
    architectures: tuple[str, ...]
    # VLMInputs fields this family consumes; any other non-empty field is an error, never dropped.
    input_fields: frozenset[str] = frozenset({"input_ids", "pixel_values", "attention_mask"})

    # ------------------------------------------------------------------ conversion

    def vlm_config(self, hf_config) -> VLMConfig:
        raise NotImplementedError

    def weight_map(self, cfg: VLMConfig) -> WeightMap:
        raise NotImplementedError

    def normalize_key(self, key: str) -> str:
        """Map any historical checkpoint key layout onto one canonical HF layout."""
        return key

    # ------------------------------------------------------------------ structure

    def load_processor(self, path, trust_remote_code: bool):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def build(self, model: "HookedVLM") -> None:
        model.attach_language(self.build_language(model.vlm_cfg))
        self.build_towers(model)

    def build_language(self, cfg: VLMConfig) -> nn.Module:
        return DecoderLM(cfg.language, Rotary.from_hf_config(cfg.language.extra["hf_config"]))

    def build_towers(self, model: "HookedVLM") -> None:
        """Attach the non-language towers (``vision``, ``projector``, ...) to the model."""
        raise NotImplementedError

    def capabilities(self, cfg: VLMConfig) -> Capabilities:
        return Capabilities()

    def towers(self, model: "HookedVLM") -> dict[str, nn.Module]:
        """Every transformer tower by name; each has ``cfg`` and ``blocks``."""
        return {"language": model.language, "vision": model.vision}

    def fp32_parameters(self, cfg: VLMConfig, dtype: torch.dtype) -> str | None:
        """A regular expression matching (from the start) the parameters HF keeps in float32 when loading in
        ``dtype`` (``_keep_in_fp32_modules``); None when there are none."""
        return None

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        """The HF modules whose outputs equal each tower's ``blocks.{i}.hook_resid_post`` (for verify)."""
        return {"language": list(hf_model.model.language_model.layers), "vision": list(hf_model.model.vision_tower.encoder.layers)}

    def align_hf_outputs(
        self, model: "HookedVLM", tower: str, outputs: list[Tensor], inputs: VLMInputs
    ) -> tuple[list[Tensor], Tensor | None]:
        """HF's per-block outputs of ``tower`` in call order -> one reference per block, and the boolean index
        that picks the same elements from tl_vlm's ``blocks.{i}.hook_resid_post`` (None: all of it)."""
        return outputs, None

    # ------------------------------------------------------------------ running

    def image_features(
        self, model: "HookedVLM", inputs: VLMInputs
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Projected image features in the order of the image placeholder tokens."""
        raise NotImplementedError

    def image_token_cells(
        self, model: "HookedVLM", inputs: VLMInputs, original_sizes: list[tuple[int, int]] | None
    ) -> list[dict]:
        """Per image token, in placeholder order: image, tile, patch, row, col, kind and pixel box
        (see analysis/spatial.py)."""
        raise NotImplementedError(f"no spatial index for the {self.name} family yet")

    def image_token_mask(self, model: "HookedVLM", input_ids: Int[Tensor, "batch pos"]) -> torch.Tensor:
        return input_ids == model.vlm_cfg.image_token_id

    def forward(
        self,
        model: "HookedVLM",
        inputs: VLMInputs,
        position_ids: Tensor | None,
        cache: KVCache | None,
        stop_at_layer: int | None,
        logits_to_keep: int,
        generated_from: int | None,
    ) -> Tensor:
        """Embed text, merge image features at the placeholders, run the language tower."""
        ids, mask = inputs.input_ids, inputs.attention_mask
        image_mask = self.image_token_mask(model, ids)
        if generated_from is not None:
            image_mask[:, generated_from:] = False
        features = self._checked_features(model, inputs, image_mask)
        embeds = model.language.embed_inputs(ids, features, image_mask if features is not None else None)
        return model.language(embeds, mask, position_ids, cache, stop_at_layer, logits_to_keep)

    def _checked_features(self, model: "HookedVLM", inputs: VLMInputs, image_mask: Tensor) -> Tensor | None:
        n_placeholders = int(image_mask.sum())
        token = model.vlm_cfg.image_token_id
        if inputs.pixel_values is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholder tokens (id {token}) but no pixel_values were "
                    "given; pass the processor's pixel_values (model.prepare(images=..., text=...)) or drop the placeholders"
                )
            return None
        if not n_placeholders:
            raise ValueError(
                f"pixel_values were given but input_ids hold no image placeholder token (id {token}), so the image "
                "would be ignored; put the image token in the prompt (model.prepare does this)"
            )
        features = self.image_features(model, inputs)
        if features.shape[0] != n_placeholders:
            raise ValueError(
                f"the images give {features.shape[0]} feature vectors but input_ids hold {n_placeholders} image "
                "placeholder tokens; build prompt and images together with the model's processor (model.prepare)"
            )
        return features

    # ------------------------------------------------------------------ generation

    def generate(
        self, model: "HookedVLM", inputs: VLMInputs, settings, use_past_kv_cache: bool, generator: torch.Generator | None
    ) -> Int[Tensor, "batch pos"] | None:
        """Tokens for families that generate differently (encoder-decoder LMs); None: HookedVLM's decoder-only loop."""
        return None

    # ------------------------------------------------------------------ generation positions

    def prefill_positions(self, model: "HookedVLM", inputs: VLMInputs, mask: Tensor) -> Tensor:
        """Prompt positions as HF's generate computes them: left padding does not shift them."""
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def next_positions(self, model: "HookedVLM", positions: Tensor) -> Tensor:
        """Positions of the next generated token (last axis is the sequence)."""
        return positions[..., -1:] + 1
