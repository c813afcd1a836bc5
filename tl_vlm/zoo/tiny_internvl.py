"""Tiny, random-init InternVL checkpoints built fully offline.

``internvl3`` keeps the flags of InternVL3-1B-hf at toy size: InternViT with LayerNorm blocks, qkv biases, layer
scale, a class token, mean pooling (so no final LayerNorm), ``vision_feature_layer`` -1 with the "default"
strategy, ``downsample_ratio`` 0.5, a gelu projector, and a Qwen2.5 LM (GQA, qkv biases, tied embeddings, theta
1e6). ``internvl_6b_qwen3`` keeps InternViT-6B's flags (RMSNorm blocks, QK-norm over the whole width, no qkv
biases; here with the final LayerNorm) in front of a Qwen3 LM (per-head QK-norm), as InternVL3.5 pairs them.
Tiles are 24 px of 4 px patches (6x6 patches, 3x3 = 9 tokens a tile), at most 4 crops plus the thumbnail.
Norm gains, biases and layer scales get noise (see ``zoo/tiny.py``).

Saved with ``save_pretrained``: model, tokenizer (Qwen specials plus ``<img>``, ``</img>``, ``<IMG_CONTEXT>``,
``<video>``), the PIL image processor (``GotOcr2ImageProcessorPil``) and a hub-style ``processor_config.json``.
``InternVLProcessor`` cannot be built without torchvision (its video processor), so tl_vlm loads
``families/internvl_processor.InternVLImageTextProcessor`` from the same files.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from transformers import (
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tl_vlm.zoo.build_cache import cached_build
from tl_vlm.zoo.tiny_qwen_vl import build_qwen_tokenizer

__all__ = ["IMAGE_TOKEN", "VARIANTS", "build_internvl_tokenizer", "build_tiny_internvl", "chat", "image_processor"]

VARIANTS = ("internvl3", "internvl_6b_qwen3")
_FORMAT_VERSION = 1

IMAGE_SIZE = 24
PATCH_SIZE = 4
MAX_PATCHES = 4
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE // 2) ** 2
IMAGE_TOKEN = "<IMG_CONTEXT>"
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1

SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "im_start": "<|im_start|>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": IMAGE_TOKEN,
    "video_token": "<video>",
}

# InternVL3's template, reduced: each image as "<IMG_CONTEXT>\n" before the text of its message.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat(content: str) -> str:
    """A user turn followed by the assistant's prompt, as the chat template writes it."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    return build_qwen_tokenizer(special_tokens=SPECIAL_TOKENS, chat_template=_CHAT_TEMPLATE)


def _config(variant: str, tok: PreTrainedTokenizerFast) -> InternVLConfig:
    six_b = variant == "internvl_6b_qwen3"
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, hidden_act="gelu", norm_type="rms_norm" if six_b else "layer_norm",
        layer_norm_eps=1e-6, attention_bias=not six_b, use_qk_norm=six_b, layer_scale_init_value=0.1,
        use_mean_pooling=not six_b, initializer_range=_INIT_RANGE,
    )
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        initializer_range=_INIT_RANGE, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    text = Qwen3Config(**common, head_dim=16) if six_b else Qwen2Config(**common, use_sliding_window=False)
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
    )


def image_processor() -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=True, min_patches=1, max_patches=MAX_PATCHES
    )


def build_tiny_internvl(path: str | os.PathLike, variant: str = "internvl3", seed: int = 0) -> pathlib.Path:
    """Build and save the checkpoint into ``path`` (idempotent per variant and seed; torch's RNG state is kept)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def build(target: pathlib.Path) -> None:
        tok = build_internvl_tokenizer()
        model = InternVLForConditionalGeneration(_config(variant, tok))
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1 or param.shape[:2] == (1, 1):  # norms, biases, layer scales, the class token
                    param.add_(torch.randn_like(param) * _VECTOR_NOISE)
            # HF zero-initialises the positions table: give it values, so a misplaced position would show.
            model.model.vision_tower.embeddings.position_embeddings.normal_(0, _INIT_RANGE)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.to(torch.float32).eval().save_pretrained(target)
        tok.save_pretrained(target)
        image_processor().save_pretrained(target)
        config = {"processor_class": "InternVLProcessor", "image_seq_length": IMAGE_SEQ_LENGTH}
        (target / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
