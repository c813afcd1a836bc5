"""What a model family provides: config translation, towers, weight map and image features."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from jaxtyping import Float
from torch import Tensor

from tl_vlm.config import VLMConfig
from tl_vlm.families.weights import WeightMap

if TYPE_CHECKING:
    from tl_vlm.hooked_vlm import HookedVLM


class Family(Protocol):
    name: str
    architectures: tuple[str, ...]

    def vlm_config(self, hf_config) -> VLMConfig: ...

    def build_towers(self, model: "HookedVLM") -> None:
        """Attach the non-language towers (``vision``, ``projector``, ...) to the model."""

    def weight_map(self, cfg: VLMConfig) -> WeightMap: ...

    def normalize_key(self, key: str) -> str:
        """Map any historical checkpoint key layout onto one canonical HF layout."""

    def image_features(
        self, model: "HookedVLM", pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Projected image features in the order of the image placeholder tokens."""
