"""The HF internals tl_vlm calls to reproduce HF's exact token order, each isolated in one function.

These are methods of HF model classes that read only ``self.config`` (and sibling methods), so they run on a
stand-in object instead of a built HF model. They are not public API: tests/test_hf_compat.py checks each
against HF's own model on a tiny config, so a transformers release that changes them fails there, loudly.
Supported transformers: the range in pyproject.toml (>=5.9,<6).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from jaxtyping import Int
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel


def llava_next_pack(hf_config, features: list[Tensor], image_sizes: Tensor, strategy: str, newline: Tensor) -> list[Tensor]:
    """``LlavaNextModel.pack_image_features``: tiles of each image -> its token sequence (grid, unpadding,
    ``image_newline`` after each row)."""
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=hf_config), features, image_sizes, vision_feature_select_strategy=strategy,
        image_newline=newline,
    )
    return packed


def llava_onevision_pack(hf_config, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
    """``LlavaOnevisionModel.pack_image_features``: as LLaVA-NeXT's, plus the anyres_max bilinear downsampling of
    large tile grids (``vision_aspect_ratio``)."""
    packed, _ = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=hf_config), features, image_sizes, image_newline=newline,
        vision_aspect_ratio=hf_config.vision_aspect_ratio,
    )
    return packed


def qwen_rope_index(hf_model_class, hf_config, input_ids: Tensor, **kwargs) -> Int[Tensor, "3 batch pos"]:
    """``Qwen2VLModel.get_rope_index`` (or Qwen2.5-VL's): 3D M-RoPE positions of a prompt with images / videos."""
    shim = SimpleNamespace(config=hf_config)
    shim.get_vision_position_ids = functools.partial(hf_model_class.get_vision_position_ids, shim)
    positions, _ = hf_model_class.get_rope_index(shim, input_ids, **kwargs)
    return positions
