"""A tiny, random-init Llama 3.2 Vision (``MllamaForConditionalGeneration``) built fully offline.

It keeps Llama-3.2-11B-Vision's flags at toy sizes: tiles of a fixed size with up to 4 tiles per image and the
8 default aspect ratios, a class token, positions padded to a multiple of 8 per tile (5 -> 8, as 1025 -> 1032), gelu ViT layers (local) then gated global layers, intermediate local layers concatenated to the
output (interleaved, as HF stacks them), a linear projector, and a Llama-3 language model (GQA, llama3 RoPE, RMS
eps 1e-5) with gated cross-attention layers in between self-attention layers. The ``<|image|>`` token is the last
id, one past the output vocabulary, as in the real checkpoints (its embedding row is one of the 8 extra ones).
"""

from __future__ import annotations

import os
import pathlib
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

from tl_vlm.zoo.build_cache import cached_build
from tl_vlm.zoo.tiny import _WORDS

__all__ = ["IMAGE_TOKEN", "TILE_SIZE", "build_mllama_tokenizer", "build_tiny_mllama"]

_FORMAT_VERSION = 2
IMAGE_TOKEN = "<|image|>"
TILE_SIZE = 12  # 2x2 patches of 6 px + the class token = 5 positions, padded to 8 (as 1025 to 1032)
PATCH_SIZE = 6
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1  # norm gains and biases away from 1 / 0, so a dropped one shows
SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
# Llama 3.2 Vision's user / assistant turn, image first.
_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<|image|>' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)


def build_mllama_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with character fallback, Llama 3's specials, and ``<|image|>`` as the last id."""
    chars = string.ascii_letters + string.digits + "_"
    tokens = ["<unk>", *SPECIALS.values(), "<|start_header_id|>", "<|end_header_id|>", *_WORDS, *chars,
              *("##" + c for c in chars), *string.punctuation, "\n", IMAGE_TOKEN]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", **SPECIALS,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "start_header": "<|start_header_id|>",
                              "end_header": "<|end_header_id|>"},
        padding_side="left", chat_template=_CHAT_TEMPLATE,
    )


def _config(tok: PreTrainedTokenizerFast) -> MllamaConfig:
    vision = dict(
        hidden_size=32, intermediate_size=64, attention_heads=4, num_hidden_layers=4, num_global_layers=2,
        intermediate_layers_indices=[0, 2], vision_output_dim=32 * 3, image_size=TILE_SIZE, patch_size=PATCH_SIZE,
        max_num_tiles=4, hidden_act="gelu", norm_eps=1e-5, initializer_range=_INIT_RANGE,
    )
    text = dict(
        vocab_size=len(tok) - 1, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[2, 3], hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=512, initializer_range=_INIT_RANGE, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))


def build_tiny_mllama(path: str | os.PathLike, variant: str = "mllama", seed: int = 0) -> pathlib.Path:
    """Build and save model, tokenizer and processor into ``path`` (idempotent, seeded); returns the path."""

    def build(target: pathlib.Path) -> None:
        tok = build_mllama_tokenizer()
        model = MllamaForConditionalGeneration(_config(tok))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * _VECTOR_NOISE)
                if "gate" in name:  # HF initialises the gates at 0 (tanh 0: the gated paths would be off)
                    param.uniform_(0.3, 1.2)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.to(torch.float32).eval().save_pretrained(target)
        image_processor = MllamaImageProcessorPil(size={"height": TILE_SIZE, "width": TILE_SIZE}, max_image_tiles=4)
        MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=_CHAT_TEMPLATE).save_pretrained(target)

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
