"""A tiny, random-init SigLIP 2 (NaFlex) dual encoder built fully offline.

It keeps google/siglip2-base-patch16-naflex's flags at toy sizes: 16px patches through a linear patchifier, a square
learned position grid (here 4 x 4) resized per image, gelu tanh, eps 1e-6, attention-pooling head, SigLIP's
bidirectional text tower pooled at the last position with a biased head, and a logit bias. The image processor allows
more patches than the grid has (24 > 16; the real checkpoint is used with up to 1024 over its 16 x 16 grid), so the
grid is both stretched and shrunk (antialiased) across images of different aspect ratios, and padded. Saved with
``save_pretrained`` next to a tiny BPE tokenizer of SigLIP 2's own class (HF loads any SigLIP 2 tokenizer as
``Siglip2Tokenizer``, a Gemma-style BPE, so a tokenizer of another kind would not survive the round trip) and HF's
processor (its PIL backend, no torchvision), so ``HookedCLIP.from_pretrained(path)`` runs its real loading path.
"""

from __future__ import annotations

import math
import os
import pathlib

import torch
import string

from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

from tl_vlm.zoo.build_cache import cached_pretrained_build
from tl_vlm.zoo.tiny_clip import _WORDS

__all__ = ["build_tiny_siglip2", "build_siglip2_tokenizer", "PATCH_SIZE", "MAX_NUM_PATCHES"]

_FORMAT_VERSION = 1
PATCH_SIZE = 16
GRID_PATCHES = 16  # the learned position grid: 4 x 4
MAX_NUM_PATCHES = 24
TEXT_POSITIONS = 16
_VECTOR_NOISE = 0.1


def build_siglip2_tokenizer() -> Siglip2Tokenizer:
    """Gemma-style BPE over characters, with merges that spell each known word after a space ("▁red"); other text
    falls back to characters. Lowercased, no end-of-text token (SigLIP 2 pools the last position, whatever it is)."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"])}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in dict.fromkeys(w.lower() for w in _WORDS):
        piece = "▁"
        for ch in word:
            vocab.setdefault(ch, len(vocab))
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    return Siglip2Tokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_POSITIONS)


def _build():
    tok = build_siglip2_tokenizer()
    config = Siglip2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS, hidden_act="gelu_pytorch_tanh",
                         layer_norm_eps=1e-6, projection_size=32, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=PATCH_SIZE, num_patches=GRID_PATCHES, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6),
    )
    model = Siglip2Model(config)
    processor = Siglip2Processor(
        image_processor=Siglip2ImageProcessorPil(patch_size=PATCH_SIZE, max_num_patches=MAX_NUM_PATCHES), tokenizer=tok)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model.to(torch.float32).eval(), processor


def build_tiny_siglip2(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build and save the tiny SigLIP 2 (model + config + tokenizer + processor) into ``path``; idempotent."""
    return cached_pretrained_build(path, "siglip2", seed, _FORMAT_VERSION, lambda: _build())
