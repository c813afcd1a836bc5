"""Tiny, random-init Pixtral-12B and Mistral-Small-3.1 checkpoints built fully offline.

``pixtral`` keeps the flags of mistral-community/pixtral-12b (``LlavaForConditionalGeneration``): a Pixtral ViT
(RMSNorm eps 1e-5, gated SiLU MLP, 2D rotary with theta 1e4, no biases, patch 16 here 4, longest edge 1024 here
32), ``vision_feature_layer`` -1 with the "full" strategy, a gelu MLP projector with biases, and a Mistral LM
with GQA, an explicit ``head_dim`` unequal to hidden / heads (5120 / 32 vs 128; here 64 / 4 vs 32), rope theta
1e9, no sliding window, untied embeddings. ``mistral3`` keeps Mistral-Small-3.1-24B's
(``Mistral3ForConditionalGeneration``): the same tower (patch 14 here 4), a 2x2 patch merger after an RMSNorm
with the LM's eps, a projector without biases. Norm gains get noise, as in ``zoo/tiny.py``.

Saved with ``save_pretrained``: model, tokenizer (``<s>``, ``[INST]``, ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``)
with a reduced Mistral chat template, the PIL image processor and a hub-style ``processor_config.json``. HF's
``PixtralProcessor`` cannot be built without torchvision, so ``AutoProcessor`` fails on this directory as on the
real checkpoints without it; tl_vlm then loads ``families/pixtral_processor.PixtralImageTextProcessor``.
"""

from __future__ import annotations

import json
import os
import pathlib
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from tl_vlm.zoo.build_cache import cached_build

__all__ = ["VARIANTS", "build_pixtral_tokenizer", "build_tiny_pixtral", "chat"]

VARIANTS = ("pixtral", "mistral3")
_FORMAT_VERSION = 1

PATCH_SIZE = 4
LONGEST_EDGE = 32  # at most 8x8 patches an image
IMAGE, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
_INIT_RANGE = 0.08
_VECTOR_NOISE = 0.1  # see zoo/tiny.py: HF's init of norm gains to 1 would hide dropped weights

_WORDS = """
What what Which which Where where Is is Describe describe the a an this that it in on of and or to with colour
color shape object image picture red green blue yellow white black square circle triangle left right top bottom
first second one two see like please
""".split()

# Mistral's chat format, reduced: "<s>[INST][IMG]What is the colour?[/INST]" (the tokenizer adds <s>).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '[IMG]' }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '[/INST]' }}"
    "{%- else -%}{{ message['content'] + '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
)


def chat(content: str) -> str:
    """One user turn as the chat template writes it (``[IMG]`` where an image goes)."""
    return f"[INST]{content}[/INST]"


def build_pixtral_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with character fallback, BOS ``<s>`` and Mistral's image and instruction tokens."""
    chars = string.ascii_letters + string.digits + "_"
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", IMAGE, BREAK, END, "<pad>"]
    tokens = [*specials, *_WORDS, *chars, *("##" + c for c in chars), *string.punctuation, "\n"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE, "image_break_token": BREAK, "image_end_token": END,
                              "inst": "[INST]", "inst_end": "[/INST]"},
        add_bos_token=True, add_eos_token=False, padding_side="left", chat_template=_CHAT_TEMPLATE,
    )


def _vision_config(variant: str) -> PixtralVisionConfig:
    return PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=LONGEST_EDGE,
        patch_size=PATCH_SIZE, hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
        initializer_range=_INIT_RANGE,
    )


def _text_config(tok: PreTrainedTokenizerFast) -> MistralConfig:
    return MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, hidden_act="silu", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9}, sliding_window=None, tie_word_embeddings=False,
        initializer_range=_INIT_RANGE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _model(variant: str, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    common = dict(
        vision_config=_vision_config(variant), text_config=_text_config(tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE), projector_hidden_act="gelu", vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    if variant == "pixtral":
        config = LlavaConfig(**common, vision_feature_select_strategy="full", multimodal_projector_bias=True,
                             image_seq_length=1)
        return LlavaForConditionalGeneration(config)
    return Mistral3ForConditionalGeneration(Mistral3Config(**common, spatial_merge_size=2, multimodal_projector_bias=False))


def processor_config(variant: str) -> dict:
    """What the hub checkpoint's ``processor_config.json`` holds, at toy size."""
    return {"processor_class": "PixtralProcessor", "patch_size": PATCH_SIZE,
            "spatial_merge_size": 1 if variant == "pixtral" else 2, "image_token": IMAGE, "image_break_token": BREAK,
            "image_end_token": END}


def build_tiny_pixtral(path: str | os.PathLike, variant: str = "pixtral", seed: int = 0) -> pathlib.Path:
    """Build and save the checkpoint into ``path`` (idempotent per variant and seed; the torch RNG is left untouched)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def build(target: pathlib.Path) -> None:
        tok = build_pixtral_tokenizer()
        model = _model(variant, tok)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * _VECTOR_NOISE)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.to(torch.float32).eval().save_pretrained(target)
        tok.save_pretrained(target)
        PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE},
                                 patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE}).save_pretrained(target)
        (target / "processor_config.json").write_text(json.dumps(processor_config(variant), indent=2) + "\n")

    return cached_build(path, variant, seed, _FORMAT_VERSION, build)
