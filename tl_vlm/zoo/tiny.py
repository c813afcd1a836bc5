"""Tiny, random-init LLaVA-family checkpoints built fully offline.

Each variant keeps the architectural flags of a real checkpoint (activation functions, norm eps, GQA, qkv
bias, tied embeddings, vision feature layer/strategy, anyres tiling) at toy sizes, and is saved with
``save_pretrained`` next to a tiny word-level tokenizer and a matching HF processor, so that
``AutoConfig`` / ``AutoProcessor`` / ``*ForConditionalGeneration.from_pretrained(path)`` load it back.
"""

from __future__ import annotations

import os
import pathlib
import string
from collections.abc import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from tl_vlm.zoo.build_cache import cached_pretrained_build

__all__ = ["VARIANTS", "build_tiny_vlm", "build_tokenizer"]

VARIANTS = ("llava15", "llava_qwen2", "llava_next_mistral", "llava_interleave_siglip")

# Bump whenever the built artefacts change, so stale cached builds are rebuilt.
_FORMAT_VERSION = 1

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 30
PATCH_SIZE = 6
# (height, width) resolutions for anyres tiling; multiples of IMAGE_SIZE.
GRID_PINPOINTS = [[30, 60], [60, 30], [60, 60], [30, 90], [90, 30]]
_INIT_RANGE = 0.08
# Real checkpoints have non-trivial norm gains and biases; HF init sets them to 1/0, which would hide
# weight-conversion bugs (a dropped LN weight or qkv bias would still match), so they get this much noise.
_VECTOR_NOISE = 0.1

_WORDS = """
USER ASSISTANT SYSTEM user assistant system What what Which which Where where Is is Are are Does does
Do do Can can How how many Describe describe Answer answer Please please Yes yes No no The the A a an
This this That that There there It it in on of and or to with at colour color shape object image
picture photo size red green blue yellow orange purple pink white black grey gray brown square circle
triangle rectangle star dot left right top bottom center centre middle corner background foreground
small large big tiny one two three four see shown show looks like INST
""".split()

# LLaVA-1.5 style prompt: "USER: <image>\nWhat is the colour? ASSISTANT:".
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)



def build_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    # WordPiece over words + single characters: known words are one token, anything else ASCII falls back
    # to characters, so no prompt degenerates into <unk>s. Specials sit at both ends like llava-hf
    # (<unk>/<s>/</s> first, <image>/<pad> appended after the base vocabulary).
    chars = string.ascii_letters + string.digits + "_"
    tokens = ["<unk>", "<s>", "</s>", *_WORDS, *extra_words, *chars, *("##" + c for c in chars)]
    tokens += [*string.punctuation, "\n", IMAGE_TOKEN, "<pad>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}

    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    # Keep words, single punctuation marks and newlines; drop other whitespace.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    backend.decoder = decoders.WordPiece()
    # add_bos_token makes the wrapper install a TemplateProcessing post-processor ("<s> $A"); it is
    # serialised in tokenizer.json, so reloaded tokenizers prepend BOS as well. <image> is registered as
    # a special added token, so it is matched before pre-tokenisation even without surrounding spaces.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        chat_template=_CHAT_TEMPLATE,
    )


# Toy ViT sizes shared by the CLIP and SigLIP towers: 30px / 6px patches = 5x5 patches.
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE, initializer_range=_INIT_RANGE)


def _vision_config() -> CLIPVisionConfig:
    # CLIP ViT-L/14-336 flags: quick_gelu, eps 1e-5, a class token.
    return CLIPVisionConfig(**_VIT, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)


def _siglip_vision_config() -> SiglipVisionConfig:
    # SigLIP-so400m of llava-interleave / OneVision: no class token, no pre-LN, patch bias, gelu tanh, eps 1e-6.
    return SiglipVisionConfig(**_VIT, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _text_config(variant: str, tok: PreTrainedTokenizerFast) -> PreTrainedConfig:
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        hidden_act="silu",
        initializer_range=_INIT_RANGE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if variant == "llava15":  # Vicuna-7B (Llama)
        return LlamaConfig(
            **common,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attention_bias=False,
            tie_word_embeddings=False,
        )
    if variant in ("llava_qwen2", "llava_interleave_siglip"):  # Qwen2 LM of llava-interleave: GQA, qkv bias, tied
        return Qwen2Config(
            **common,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    # Mistral-7B-Instruct-v0.2: GQA, no sliding window, theta 1e6
    return MistralConfig(
        **common,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None,
        tie_word_embeddings=False,
    )


def _build(variant: str, tok: PreTrainedTokenizerFast) -> tuple[PreTrainedModel, ProcessorMixin]:
    text_config = _text_config(variant, tok)
    siglip = variant == "llava_interleave_siglip"
    strategy = "full" if variant in ("llava_qwen2", "llava_interleave_siglip") else "default"
    class_token = not siglip
    common = dict(
        vision_config=_siglip_vision_config() if siglip else _vision_config(),
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        # "full" keeps the class token, "default" drops the first token
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2 + class_token - (strategy == "default"),
        projector_hidden_act="gelu",
        vision_feature_layer={"llava_qwen2": [-3, -1], "llava_interleave_siglip": -1}.get(variant, -2),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    processor_kwargs = dict(
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(class_token),  # CLIP's CLS token
        chat_template=_CHAT_TEMPLATE,
    )
    # torchvision-free (PIL/numpy) image processors; AutoProcessor reloads them by their saved class name.
    image_kwargs = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})

    model: PreTrainedModel
    processor: ProcessorMixin
    if variant == "llava_next_mistral":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=GRID_PINPOINTS))
        image_processor = LlavaNextImageProcessorPil(**image_kwargs, image_grid_pinpoints=GRID_PINPOINTS)
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_kwargs)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = (
            SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}) if siglip
            else CLIPImageProcessorPil(**image_kwargs)
        )
        processor = LlavaProcessor(image_processor=image_processor, **processor_kwargs)

    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model.to(torch.float32).eval(), processor


def build_tiny_vlm(path: str | os.PathLike, variant: str = "llava15", seed: int = 0) -> pathlib.Path:
    """Build, save (model safetensors + config + tokenizer + processor) into `path`, return the path.

    Idempotent: if `path` already holds a complete build of the same variant and seed (marker file written
    last), returns without rebuilding. The global torch RNG state is left untouched.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return cached_pretrained_build(path, variant, seed, _FORMAT_VERSION, lambda: _build(variant, build_tokenizer()))


