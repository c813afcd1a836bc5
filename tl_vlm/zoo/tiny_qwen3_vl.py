"""Tiny, random-init Qwen3-VL checkpoints built fully offline.

``qwen3_vl`` keeps the flags of Qwen3-VL-2B-Instruct at toy sizes: vision LayerNorm + GELU(tanh) blocks with a
learned position table (a 4x4 table here, 48x48 there) resampled to every grid, patch-embedding bias, DeepStack
from two inner vision blocks into the first two language blocks (three there), a Qwen3 LM with QK-norm, GQA, no
q/k/v biases, ``head_dim`` from the config, tied embeddings and interleaved M-RoPE (``mrope_section`` 24:20:20 of
64 frequencies there, 4:2:2 of 8 here, so the temporal axis also takes the highest frequencies, as there).

Saved as ``tiny_qwen_vl`` saves Qwen2-VL (tokenizer + PIL image processor, no HF processor: its video processor
needs torchvision).
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import GenerationConfig, PreTrainedModel, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tl_vlm.zoo.build_cache import cached_build
from tl_vlm.zoo.tiny_qwen_vl import (
    MERGE_SIZE,
    PATCH_SIZE,
    SPECIAL_TOKENS,
    TEMPORAL_PATCH_SIZE,
    build_qwen_tokenizer,
    image_processor,
)

__all__ = ["VARIANTS", "build_tiny_qwen3_vl"]

VARIANTS = ("qwen3_vl",)

_FORMAT_VERSION = 1
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1  # norm gains 1 and biases 0 would hide a dropped weight or bias


def _text_config(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        initializer_range=_INIT_RANGE,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vision_config() -> dict:
    return dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=64,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
        hidden_act="gelu_pytorch_tanh",
        initializer_range=_INIT_RANGE,
    )


def _build(tok) -> PreTrainedModel:
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    config = Qwen3VLConfig(
        text_config=_text_config(tok),
        vision_config=_vision_config(),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.model.visual.pos_embed.weight.normal_(0, 1)  # learned positions large enough to matter
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model.to(torch.float32).eval()


def build_tiny_qwen3_vl(path: str | os.PathLike, variant: str = "qwen3_vl", seed: int = 0) -> pathlib.Path:
    """Build and save (model + config + tokenizer + image processor) into ``path``; reused when complete."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def build(target: pathlib.Path) -> None:
        tok = build_qwen_tokenizer(extra_words=("seconds",))
        _build(tok).save_pretrained(target)
        tok.save_pretrained(target)
        image_processor().save_pretrained(target)

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
