"""Tiny, random-init Qwen2-VL / Qwen2.5-VL checkpoints built fully offline.

Each variant keeps the flags of a real checkpoint at toy sizes: ``qwen2_vl`` follows Qwen2-VL-2B-Instruct
(LayerNorm + QuickGELU vision blocks, full attention per frame), ``qwen2_5_vl`` follows Qwen2.5-VL-3B-Instruct
(RMSNorm + gated SiLU vision blocks, window attention with full-attention layers). Both keep M-RoPE
(``mrope_section`` in the 16:24:24 ratio), spatial merge 2, temporal patch 2, GQA, qkv biases and tied
embeddings. The model is saved with ``save_pretrained`` next to a tiny word-level tokenizer with Qwen's
special tokens and a Qwen2-VL image processor that keeps images to a few dozen patches.

No ``Qwen2VLProcessor`` is saved: in transformers 5 it cannot be built without a video processor, and
``Qwen2VLVideoProcessor`` needs torchvision, which tl_vlm does not depend on. The directory holds its two
torchvision-free parts, the tokenizer (``AutoTokenizer``; ``AutoProcessor`` returns it too) and the PIL image
processor (``AutoImageProcessor``). Callers expand each ``<|image_pad|>`` to its feature count as the HF
processor does, and build videos as ``pixel_values_videos`` / ``video_grid_thw`` in the image processor's
layout with ``temporal_patch_size`` consecutive frames per row.
"""

from __future__ import annotations

import os
import pathlib
import string
from collections.abc import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from tl_vlm.zoo.build_cache import cached_build

__all__ = ["VARIANTS", "build_qwen_tokenizer", "build_tiny_qwen_vl", "image_processor"]

VARIANTS = ("qwen2_vl", "qwen2_5_vl")

_FORMAT_VERSION = 1

PATCH_SIZE = 4
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
# Images are resized to multiples of PATCH_SIZE * MERGE_SIZE with at most 1024 pixels: <= 64 patches each.
MIN_PIXELS = 8 * 8 * 4
MAX_PIXELS = 32 * 32
_INIT_RANGE = 0.08
# HF init sets norm gains to 1 and biases to 0, which would hide a dropped norm weight or bias; add noise.
_VECTOR_NOISE = 0.1

SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "im_start": "<|im_start|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}

_WORDS = """
user assistant system What what Which which Where where Is is Are are Does does How how many Describe describe
the a an this that there it in on of and or to with at colour color shape object image picture video frame
red green blue yellow orange purple pink white black grey square circle triangle left right top bottom centre
small large one two three see shown moves like first second
""".split()

# Qwen's chat format:
# "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_qwen_tokenizer(
    extra_words: Sequence[str] = (), special_tokens: dict[str, str] | None = None, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with character fallback and Qwen's special tokens (no BOS, as Qwen). Other Qwen-LM
    VLMs (LLaVA-OneVision) pass their own ``special_tokens`` and ``chat_template``."""
    special_tokens = special_tokens or SPECIAL_TOKENS
    chars = string.ascii_letters + string.digits + "_"
    tokens = ["<unk>", *_WORDS, *extra_words, *chars, *("##" + c for c in chars), *string.punctuation, "\n"]
    tokens += list(special_tokens.values())
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece()
    named = {k: v for k, v in special_tokens.items() if k in ("pad_token", "eos_token")}
    extra = {k: v for k, v in special_tokens.items() if k not in named}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        **named,
        extra_special_tokens=extra,
        padding_side="left",
        chat_template=chat_template or _CHAT_TEMPLATE,
    )


def _text_config(tok: PreTrainedTokenizerFast) -> dict:
    # Qwen2-VL-2B / Qwen2.5-VL-3B LMs: GQA (2 KV heads), qkv bias, RMS eps 1e-6, theta 1e6, M-RoPE 16:24:24
    # of the 64 rotary frequencies, here 2:3:3 of 8.
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        use_sliding_window=False,
        initializer_range=_INIT_RANGE,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vision_config(variant: str) -> dict:
    common = dict(
        num_heads=4,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        initializer_range=_INIT_RANGE,
    )
    if variant == "qwen2_vl":  # Qwen2-VL-2B: embed_dim 1280, mlp_ratio 4, quick_gelu
        return dict(common, depth=3, embed_dim=32, hidden_size=64, mlp_ratio=4, hidden_act="quick_gelu")
    # Qwen2.5-VL-3B: windows of 112 px = 4x4 merged tokens (here 16 px = 2x2), full attention every 8th
    # block (7, 15, 23, 31; here 1 and 3 of 4), gated SiLU MLP.
    return dict(
        common,
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        out_hidden_size=64,
        hidden_act="silu",
        window_size=PATCH_SIZE * MERGE_SIZE * 2,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=2,
    )


def _build(variant: str, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    config_cls, model_cls = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[variant]
    config = config_cls(
        text_config=_text_config(tok),
        vision_config=_vision_config(variant),
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    model = model_cls(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model.to(torch.float32).eval()


def image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )


def build_tiny_qwen_vl(path: str | os.PathLike, variant: str = "qwen2_vl", seed: int = 0) -> pathlib.Path:
    """Build, save (model safetensors + config + tokenizer + image processor) into ``path``, return the path.

    Idempotent: a complete build of the same variant and seed (marker file written last) is reused.
    The global torch RNG state is left untouched.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def build(target: pathlib.Path) -> None:
        tok = build_qwen_tokenizer()
        _build(variant, tok).save_pretrained(target)
        tok.save_pretrained(target)
        image_processor().save_pretrained(target)

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
