"""Tiny, random-init Qwen3-VL checkpoints built fully offline.

``qwen3_vl`` keeps the flags of Qwen3-VL-2B-Instruct at toy sizes: vision LayerNorm + GELU(tanh) blocks with a
learned position table (a 4x4 table here, 48x48 there) resampled to every grid, patch-embedding bias, DeepStack
from an inner vision block into the first of two language blocks (three of 28 there; several DeepStack layers are
tested on random configurations in tests/test_qwen3_vl.py, which keeps the contract's run time small), a Qwen3 LM
with QK-norm, GQA, no q/k/v biases, ``head_dim`` from the config, tied embeddings and interleaved M-RoPE
(``mrope_section`` 24:20:20 of 64 frequencies there, 4:2:2 of 8 here, so the temporal axis also takes the highest
frequencies, as there).

``qwen3_vl_moe`` follows Qwen3-VL-30B-A3B-Instruct: the same towers with mixture-of-experts MLPs (4 experts, top 2
here; 128, top 8 there; router probabilities renormalised over the chosen experts), ``head_dim`` wider than
``hidden_size / heads`` (as 128 vs 64 there) and untied embeddings. Block 0 keeps a dense MLP (``mlp_only_layers``;
every block is sparse there) so both kinds of block, and TL's neuron tools on block 0, are exercised.

Saved as ``tiny_qwen_vl`` saves Qwen2-VL (tokenizer + PIL image processor, no HF processor: its video processor
needs torchvision).
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

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

VARIANTS = ("qwen3_vl", "qwen3_vl_moe")

_FORMAT_VERSION = 3
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1  # norm gains 1 and biases 0 would hide a dropped weight or bias


def _text_config(tok) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
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


def _moe_text_config(tok) -> dict:
    rope = dict(_text_config(tok)["rope_parameters"], mrope_section=[6, 3, 3])  # 12 frequencies of head_dim 24
    return dict(_text_config(tok), head_dim=24, rope_parameters=rope, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                decoder_sparse_step=1, mlp_only_layers=[0])


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
        deepstack_visual_indexes=[1],
        hidden_act="gelu_pytorch_tanh",
        initializer_range=_INIT_RANGE,
    )


def _build(variant: str, tok) -> PreTrainedModel:
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    moe = variant == "qwen3_vl_moe"
    config_class, model_class = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    config = config_class(
        text_config=_moe_text_config(tok) if moe else _text_config(tok),
        vision_config=_vision_config(),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=not moe,
    )
    model = model_class(config)
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
        _build(variant, tok).save_pretrained(target)
        tok.save_pretrained(target)
        image_processor().save_pretrained(target)

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
