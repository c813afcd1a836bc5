"""VLMInputs: token ids with their images attached, usable wherever TransformerLens passes "tokens"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Keys processors return that these families do not consume and that carry no information we drop.
_IGNORED_KEYS = {"token_type_ids"}


@dataclass
class VLMInputs:
    """What HF processors return for the supported families; each family consumes its own subset."""

    input_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "..."] | None = None
    attention_mask: Int[Tensor, "batch pos"] | None = None
    image_sizes: Int[Tensor, "image 2"] | None = None  # LLaVA-NeXT: (height, width) per image
    batch_num_images: Int[Tensor, " prompt"] | None = None  # LLaVA-OneVision: images per prompt (>1: no tiles)
    image_grid_thw: Int[Tensor, "image 3"] | None = None  # Qwen-VL: patch grid per image
    pixel_values_videos: Float[Tensor, "..."] | None = None
    video_grid_thw: Int[Tensor, "video 3"] | None = None
    second_per_grid_ts: Float[Tensor, " video"] | None = None  # Qwen2.5-VL: seconds per temporal patch
    mm_token_type_ids: Int[Tensor, "batch pos"] | None = None
    qformer_input_ids: Int[Tensor, "batch qpos"] | None = None  # InstructBLIP: instruction for the Q-Former
    qformer_attention_mask: Int[Tensor, "batch qpos"] | None = None
    decoder_input_ids: Int[Tensor, "batch dec_pos"] | None = None  # encoder-decoder LMs (Flan-T5)
    decoder_attention_mask: Int[Tensor, "batch dec_pos"] | None = None

    @property
    def shape(self) -> torch.Size:
        """The token shape, so TL code that reads ``tokens.shape`` works unchanged."""
        return self.input_ids.shape

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device) -> "VLMInputs":
        return replace(self, **{k: v.to(device) for k, v in self.as_kwargs().items()})

    def as_kwargs(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_mapping(cls, batch: Mapping[str, Any]) -> "VLMInputs":
        known = {f.name for f in fields(cls)}
        unknown = set(batch) - known - _IGNORED_KEYS
        if unknown:
            raise ValueError(
                f"inputs {sorted(unknown)} are not used by this model; refusing to drop them silently "
                f"(accepted: {sorted(known)})"
            )
        return cls(**{k: v for k, v in batch.items() if k in known})
