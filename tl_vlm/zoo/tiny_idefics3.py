"""Tiny, random-init Idefics3 / SmolVLM checkpoints built fully offline.

``idefics3`` keeps the flags of Idefics3-8B-Llama3 at toy size: a SigLIP vision model (gelu tanh, eps 1e-6, patch
bias, post-LN) read whole by a pixel shuffle of factor 2 and one bias-free linear map, and a Llama-3 LM (GQA,
theta 5e5, untied embeddings). ``smolvlm`` keeps SmolVLM-256M-Instruct's: pixel shuffle of factor 4, a SmolLM2
(Llama) LM with GQA, tied embeddings, RMS eps 1e-5 and theta 1e5. Sub-images are 24 px (``idefics3``: 6x6
patches, 9 tokens) or 32 px (``smolvlm``: 8x8 patches, 4 tokens), images are split up to 2x2 sub-images plus
the global image. Norm gains and biases get noise (see ``zoo/tiny.py``).

Saved with ``save_pretrained``: model, tokenizer (``<image>``, ``<fake_token_around_image>``, ``<global-img>``,
``<row_r_col_c>``, ``<end_of_utterance>``), the PIL image processor, and the processor (``idefics3``:
``Idefics3Processor``; ``smolvlm``: a hub-style ``processor_config.json``, since ``SmolVLMProcessor`` needs
torchvision for its video processor and tl_vlm then builds HF's ``Idefics3Processor`` from the same files).
"""

from __future__ import annotations

import json
import os
import pathlib

import torch
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from tl_vlm.zoo.build_cache import cached_build
from tl_vlm.zoo.tiny_qwen_vl import build_qwen_tokenizer

__all__ = ["VARIANTS", "build_idefics3_tokenizer", "build_tiny_idefics3", "chat", "geometry"]

VARIANTS = ("idefics3", "smolvlm")
_FORMAT_VERSION = 1
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1

SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<end_of_utterance>",
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    **{f"row_{r}_col_{c}": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)},
}

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize + ':' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<image>' }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def chat(content: str) -> str:
    return f"User:{content}<end_of_utterance>\nAssistant:"


def geometry(variant: str) -> tuple[int, int, int]:
    """(sub-image size, patch size, pixel-shuffle scale)."""
    return (24, 4, 2) if variant == "idefics3" else (32, 4, 4)


def build_idefics3_tokenizer() -> PreTrainedTokenizerFast:
    return build_qwen_tokenizer(special_tokens=SPECIAL_TOKENS, chat_template=_CHAT_TEMPLATE)


def _model(variant: str, tok: PreTrainedTokenizerFast):
    size, patch, scale = geometry(variant)
    smol = variant == "smolvlm"
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=size,
                  patch_size=patch, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, initializer_range=_INIT_RANGE)
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, hidden_act="silu", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5 if smol else 5e5}, tie_word_embeddings=smol,
        initializer_range=_INIT_RANGE, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    common = dict(text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale,
                  tie_word_embeddings=smol, pad_token_id=tok.pad_token_id)
    if smol:
        return SmolVLMForConditionalGeneration(SmolVLMConfig(vision_config=SmolVLMVisionConfig(**vision), **common))
    return Idefics3ForConditionalGeneration(Idefics3Config(vision_config=Idefics3VisionConfig(**vision), **common))


def image_processor(variant: str):
    size = geometry(variant)[0]
    cls = SmolVLMImageProcessorPil if variant == "smolvlm" else Idefics3ImageProcessorPil
    return cls(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})


def build_tiny_idefics3(path: str | os.PathLike, variant: str = "idefics3", seed: int = 0) -> pathlib.Path:
    """Build and save the checkpoint into ``path`` (idempotent per variant and seed; torch's RNG state is kept)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def build(target: pathlib.Path) -> None:
        tok = build_idefics3_tokenizer()
        model = _model(variant, tok)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.to(torch.float32).eval().save_pretrained(target)
        size, patch, scale = geometry(variant)
        seq_len = (size // patch // scale) ** 2
        if variant == "idefics3":
            Idefics3Processor(image_processor(variant), tok, image_seq_len=seq_len, chat_template=_CHAT_TEMPLATE).save_pretrained(target)
        else:
            tok.save_pretrained(target)
            image_processor(variant).save_pretrained(target)
            config = {"processor_class": "SmolVLMProcessor", "image_seq_len": seq_len}
            (target / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
