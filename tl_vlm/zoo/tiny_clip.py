"""Tiny, random-init dual encoders (CLIP, SigLIP) built fully offline.

Each keeps its real checkpoint's flags at toy sizes: CLIP ViT-B/32 (quick_gelu, eps 1e-5, class token, causal text
tower pooled at the first end-of-text token, projections without bias) and SigLIP base (gelu tanh, eps 1e-6, no
class token, attention-pooling head, bidirectional text tower pooled at the last position, text head with bias,
logit bias). Text and vision widths differ, so a transposed projection cannot pass. Saved with ``save_pretrained``
next to a tiny word-level tokenizer and HF's processor, so ``HookedCLIP.from_pretrained(path)`` runs its real
loading path.
"""

from __future__ import annotations

import math
import os
import pathlib
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from tl_vlm.zoo.build_cache import cached_pretrained_build
from tl_vlm.zoo.data import VOCABULARY
from tl_vlm.zoo.tiny import IMAGE_SIZE, PATCH_SIZE

__all__ = ["VARIANTS", "build_tiny_clip", "build_dual_tokenizer"]

VARIANTS = ("clip", "siglip")
_FORMAT_VERSION = 1
TEXT_POSITIONS = 16
_VECTOR_NOISE = 0.1
_WORDS = ("a", "the", "photo", "of", "chart", "with", "bar", "bars", "is", "higher", "than", "lower", "left", "right",
          "on", "in", "and", "shape", "square", "circle", "triangle", *VOCABULARY)


def build_dual_tokenizer(variant: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (unknown words fall back to characters). CLIP's wraps each text in start / end-of-text
    tokens (the end token is where CLIP pools); SigLIP's appends ``</s>`` and pads with ``<pad>``."""
    clip = variant == "clip"
    chars = string.ascii_letters + string.digits
    specials = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"] if clip else ["<unk>", "<pad>", "</s>"]
    tokens = [*specials, *_WORDS, *chars, *("##" + c for c in chars), *string.punctuation]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece()
    if clip:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
            pad_token="<pad>", add_bos_token=True, add_eos_token=True, padding_side="right",
            model_max_length=TEXT_POSITIONS,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=False,
        add_eos_token=True, padding_side="right", model_max_length=TEXT_POSITIONS,
    )


def _build(variant: str):
    tok = build_dual_tokenizer(variant)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=TEXT_POSITIONS, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if variant == "clip":
        config = CLIPConfig(
            text_config={**text, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": tok.bos_token_id},
            vision_config={**vision, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
            projection_dim=24,
        )
        model = CLIPModel(config)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    else:
        config = SiglipConfig(
            text_config={**text, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "projection_size": 32,
                         "bos_token_id": None},
            vision_config={**vision, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        )
        model = SiglipModel(config)
        processor = SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                    tokenizer=tok)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.logit_scale.fill_(math.log(1 / 0.07) if variant == "clip" else math.log(10.0))
        if variant == "siglip":
            model.logit_bias.fill_(-10.0)
    return model.to(torch.float32).eval(), processor


def build_tiny_clip(path: str | os.PathLike, variant: str = "clip", seed: int = 0) -> pathlib.Path:
    """Build and save a tiny dual encoder (model + config + tokenizer + processor) into ``path``; idempotent."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return cached_pretrained_build(path, variant, seed, _FORMAT_VERSION, lambda: _build(variant))
