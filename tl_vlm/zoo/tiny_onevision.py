"""A tiny, random-init LLaVA-OneVision checkpoint built fully offline.

It keeps the flags of llava-onevision-qwen2-0.5b-ov-hf at toy size: a SigLIP tower without class token, pre-LN
or pooling head (gelu tanh, eps 1e-6), ``vision_feature_layer`` -1 with the "full" strategy, a gelu MLP projector,
``image_newline``, anyres tiling over 1x1 .. 6x6 tile grids scaled here to 1x1 .. 4x4 tiles of 30 px, and
``vision_aspect_ratio`` "anyres_max_4" (real: 9 of up to 36 tiles), so that 3x3 and larger canvases take the
bilinear downsampling branch while 2x2 ones do not; a Qwen2 LM with qkv biases, tied embeddings and one KV head.
Norm gains and biases get noise, as in ``zoo/tiny.py``.

Saved with ``save_pretrained``: model, tokenizer (Qwen specials plus ``<image>`` / ``<video>``), the PIL image
processor (``LlavaOnevisionImageProcessorPil``) and a hub-style ``processor_config.json``. No
``LlavaOnevisionProcessor`` can be built or saved without torchvision (its video processor needs it), so
``AutoProcessor`` fails on this directory as on the real checkpoint; tl_vlm then loads
``families/onevision_processor.OnevisionImageTextProcessor`` from the same files.
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from tl_vlm.zoo.build_cache import cached_build
from tl_vlm.zoo.tiny_qwen_vl import build_qwen_tokenizer

__all__ = ["IMAGE_TOKEN", "VIDEO_TOKEN", "build_onevision_tokenizer", "build_tiny_onevision", "chat"]

_FORMAT_VERSION = 1

IMAGE_SIZE = 30
PATCH_SIZE = 6  # 5x5 patches a tile
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
# (height, width) canvases: 1..4 tiles a side (the real checkpoint: 1..6 tiles of 384 px).
GRID_PINPOINTS = [[IMAGE_SIZE * i, IMAGE_SIZE * j] for i in range(1, 5) for j in range(1, 5)]
VISION_ASPECT_RATIO = "anyres_max_4"
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1  # see zoo/tiny.py: HF's 1/0 init of norms and biases would hide dropped weights

SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "im_start": "<|im_start|>",
    "image_token": IMAGE_TOKEN,
    "video_token": VIDEO_TOKEN,
}

# llava-onevision's template, reduced: images, then videos, then text of each message.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'video' -%}{{ '<video>' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ '\\n' + c['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat(content: str) -> str:
    """A user turn followed by the assistant's prompt, as the chat template writes it."""
    return f"<|im_start|>user {content}<|im_end|>\n<|im_start|>assistant\n"


def build_onevision_tokenizer() -> PreTrainedTokenizerFast:
    return build_qwen_tokenizer(special_tokens=SPECIAL_TOKENS, chat_template=_CHAT_TEMPLATE)


def _config(tok: PreTrainedTokenizerFast) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        initializer_range=_INIT_RANGE,
    )
    # Qwen2-0.5B: qkv bias, tied embeddings, RMS eps 1e-6, theta 1e6; one KV head (GQA at its extreme).
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        use_sliding_window=False, initializer_range=_INIT_RANGE, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        tie_word_embeddings=True,
    )


def image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS
    )


def processor_config() -> dict:
    """What the hub checkpoint's ``processor_config.json`` holds, at toy size."""
    return {
        "processor_class": "LlavaOnevisionProcessor",
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        "num_image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": VISION_ASPECT_RATIO,
    }


def build_tiny_onevision(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build and save the checkpoint into ``path`` (idempotent per seed; the torch RNG state is left untouched)."""

    def build(target: pathlib.Path) -> None:
        tok = build_onevision_tokenizer()
        model = LlavaOnevisionForConditionalGeneration(_config(tok))
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.to(torch.float32).eval().save_pretrained(target)
        tok.save_pretrained(target)
        image_processor().save_pretrained(target)
        (target / "processor_config.json").write_text(json.dumps(processor_config(), indent=2) + "\n")

    return cached_build(path, "llava_onevision", seed, _FORMAT_VERSION, build)
