"""Tiny random-init BLIP-2 / InstructBLIP checkpoints built fully offline.

Each variant keeps the flags of a real checkpoint (blip2-opt-2.7b, blip2-flan-t5-xl,
instructblip-vicuna-7b, instructblip-flan-t5-xl): the ViT's qkv-bias layout and eps, the Q-Former's
cross-attention every 2nd layer and BERT eps, OPT's pre-LN / ReLU / learned positions / tied
embeddings, Flan-T5's gated-gelu, relative-position buckets and untied head, the image token in
``input_ids``. Sizes are toy, and ``num_query_tokens`` is 8 instead of 32 (nothing in the model
depends on the count). Saved with ``save_pretrained`` beside a tiny tokenizer (and, for InstructBLIP,
a Q-Former tokenizer) and the HF processor, so ``from_pretrained(path)`` loads it back.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaConfig,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    T5Config,
)

from tl_vlm.zoo.tiny import IMAGE_SIZE, IMAGE_TOKEN, PATCH_SIZE, build_tokenizer
from tl_vlm.zoo.build_cache import cached_pretrained_build

__all__ = ["NUM_QUERY_TOKENS", "VARIANTS", "build_tiny_blip2"]

VARIANTS = ("blip2_opt", "blip2_flan_t5", "instructblip_vicuna", "instructblip_flan_t5")
NUM_QUERY_TOKENS = 8

_FORMAT_VERSION = 2
_INIT_RANGE = 0.08
# As in zoo/tiny.py: HF initialises norms/biases to 1/0, which would hide a dropped norm weight or bias.
_VECTOR_NOISE = 0.1


def _vision_config() -> dict:
    # EVA ViT-g of BLIP-2 (gelu, eps 1e-6, q/v bias) at 30px / 6px patches: 25 patches + class token.
    # Wider than the Q-Former so a mixed-up width fails loudly.
    return dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        initializer_range=_INIT_RANGE,
    )


def _qformer_config(tok: PreTrainedTokenizerFast | None) -> dict:
    # BERT-base-style Q-Former: cross-attention every 2nd layer (layers 0 and 2 here), eps 1e-12.
    config = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        cross_attention_frequency=2,
        max_position_embeddings=64,
        initializer_range=_INIT_RANGE,
    )
    if tok is not None:  # InstructBLIP: the instruction enters the Q-Former
        config.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return config


def _text_config(variant: str, tok: PreTrainedTokenizerFast) -> PreTrainedConfig:
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if variant == "blip2_opt":  # OPT-2.7b: pre-LN, ReLU, learned positions (offset 2), tied head
        return OPTConfig(
            vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, do_layer_norm_before=True, word_embed_proj_dim=64,
            activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
            tie_word_embeddings=True, init_std=_INIT_RANGE, **ids,
        )
    if variant == "instructblip_vicuna":  # Vicuna-7b (Llama)
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, hidden_act="silu", rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False,
            tie_word_embeddings=False, initializer_range=_INIT_RANGE, **ids,
        )
    # Flan-T5-xl: gated-gelu, 32 buckets / max distance 128, untied head (so no output rescaling)
    return T5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, initializer_factor=1.0,
    )


def _build(
    variant: str, tok: PreTrainedTokenizerFast, qformer_tok: PreTrainedTokenizerFast
) -> tuple[PreTrainedModel, ProcessorMixin]:
    instruct = variant.startswith("instructblip")
    text_config = _text_config(variant, tok)
    config_cls = InstructBlipConfig if instruct else Blip2Config
    config = config_cls(
        vision_config=_vision_config(),
        qformer_config=_qformer_config(qformer_tok if instruct else None),
        text_config=text_config,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        initializer_range=_INIT_RANGE,
    )
    model_cls = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    model = model_cls(config)
    with torch.no_grad():
        # HF initialises the query tokens to zeros; real ones are trained vectors.
        model.query_tokens.normal_(0.0, 1.0)
        if variant.endswith("flan_t5"):
            # Flan-T5 checkpoints ship their own lm_head. transformers' T5Config ties it to the embedding
            # regardless, and unties on load when the file holds a different one: save a different one.
            lm = model.language_model
            lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.shared.weight) * _INIT_RANGE * 10)
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * _VECTOR_NOISE)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **({"decoder_start_token_id": tok.pad_token_id} if variant.endswith("flan_t5") else {}),
    )
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if instruct:
        processor = InstructBlipProcessor(image_processor, tok, qformer_tok, num_query_tokens=NUM_QUERY_TOKENS)
    else:
        processor = Blip2Processor(image_processor, tok, num_query_tokens=NUM_QUERY_TOKENS)
    return model.to(torch.float32).eval(), processor


def _tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    # The tiny vocabulary of zoo/tiny.py without its ``image_token`` attribute: as with the real BLIP-2
    # tokenizers, the processor registers ``<image>`` itself (HF's processors expect an AddedToken there).
    base = build_tokenizer(extra_words)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", add_bos_token=True, padding_side="left",
    )


def build_tiny_blip2(path: str | os.PathLike, variant: str = "blip2_opt", seed: int = 0) -> pathlib.Path:
    """Build and save a tiny checkpoint of ``variant`` into ``path``; returns the path.

    Idempotent: a complete build of the same variant and seed (marker file written last) is reused.
    The global torch RNG state is left untouched.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return cached_pretrained_build(path, variant, seed, _FORMAT_VERSION, lambda: _build(variant, _tokenizer(), _tokenizer()))
