"""Tiny, random-init Gemma 3 and PaliGemma 1 / 2 checkpoints built fully offline.

Each keeps its real checkpoint's flags at toy size:

- ``gemma3`` (gemma-3-4b-it): SigLIP without pooling head (gelu tanh, eps 1e-6) whose post-LN output is average-pooled
  to ``mm_tokens_per_image`` (4x4 patches -> 2x2 tokens), Gemma RMSNorm + linear projector; a Gemma 3 LM with GQA,
  QK-norm, ``query_pre_attn_scalar`` != head_dim, sliding and global layers with their own RoPE (global: linear
  scaling x8, base 1e6; local: base 1e4), a sliding window short enough for the prompts to exceed it, tied
  embeddings; boi / image soft / eoi tokens and ``Gemma3Processor`` with the PIL image processor.
- ``paligemma`` (paligemma-3b-mix-224): SigLIP -> linear (with bias) -> Gemma 1 (multi-query, no post-norms).
- ``paligemma2`` (paligemma2-3b-pt-224): SigLIP -> linear -> Gemma 2 (GQA, norms before and after, attention and
  final logit soft caps, sliding and global layers).

Norm gains (Gemma stores ``w`` of ``1 + w``, zero at init) and biases get noise, and so does Gemma 3's projection
matrix (HF initialises it to zero), so a dropped weight cannot pass unnoticed.
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    GenerationConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from tl_vlm.zoo.build_cache import cached_pretrained_build
from tl_vlm.zoo.tiny import build_tokenizer

__all__ = ["VARIANTS", "build_gemma_tokenizer", "build_tiny_gemma"]

VARIANTS = ("gemma3", "paligemma", "paligemma2")
_FORMAT_VERSION = 1

IMAGE_SIZE, PATCH_SIZE = 32, 8  # 4x4 patches
BOI, IMAGE_SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
PALI_IMAGE = "<image>"
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1


def build_gemma_tokenizer(variant: str) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer (zoo/tiny.py) with Gemma 3's boi / soft image / eoi tokens, or PaliGemma's
    ``<image>`` (BOS prepended, as Gemma's tokenizer does)."""
    base = build_tokenizer(extra_words=["model", "turn"])
    specials = {"image_token": IMAGE_SOFT, "boi_token": BOI, "eoi_token": EOI} if variant == "gemma3" else {"image_token": PALI_IMAGE}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=specials, add_bos_token=True, add_eos_token=False, padding_side="left",
    )
    return tok


def _siglip(variant: str) -> SiglipVisionConfig:
    # So400m (Gemma 3, PaliGemma 2) / B-16 (PaliGemma 1) flags: gelu tanh, eps 1e-6, no pooling head in the VLM.
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        initializer_range=_INIT_RANGE, projection_dim=64,
    )


def _text(variant: str, tok: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=_INIT_RANGE,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if variant == "gemma3":
        return Gemma3TextConfig(
            **common, num_key_value_heads=2, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=64,
            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        )
    if variant == "paligemma":
        return GemmaConfig(**common, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh",
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Gemma2Config(
        **common, num_key_value_heads=2, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=64,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _build(variant: str):
    tok = build_gemma_tokenizer(variant)
    text, vision = _text(variant, tok), _siglip(variant)
    ids = dict(zip(("image", "boi", "eoi"), tok.convert_tokens_to_ids([IMAGE_SOFT, BOI, EOI]))) if variant == "gemma3" else {}
    if variant == "gemma3":
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=ids["image"],
                              boi_token_index=ids["boi"], eoi_token_index=ids["eoi"], tie_word_embeddings=True)
        model = Gemma3ForConditionalGeneration(config)
        image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4)
    else:
        n_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
        config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids(PALI_IMAGE),
                                 projection_dim=text.hidden_size, hidden_size=text.hidden_size, tie_word_embeddings=True)
        config.vision_config.projection_dim = text.hidden_size
        config.text_config.num_image_tokens = n_tokens
        model = PaliGemmaForConditionalGeneration(config)
        image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        image_processor.image_seq_length = n_tokens
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
            elif name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, _INIT_RANGE)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    return model.to(torch.float32).eval(), processor


def build_tiny_gemma(path: str | os.PathLike, variant: str = "gemma3", seed: int = 0) -> pathlib.Path:
    """Build and save (model, config, tokenizer, processor) into ``path`` unless already built; returns the path."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return cached_pretrained_build(path, variant, seed, _FORMAT_VERSION, lambda: _build(variant))
