"""Dual encoders (CLIP, SigLIP): HF text / vision model configs -> tower configs, HF keys -> TL names.

The vision tower is the shared ViT (``vits.vit_config`` / ``vit_rules``) plus its pooling and projection; the text
tower is ``towers/text_encoder.TextEncoder``.
"""

from __future__ import annotations

from tl_vlm.config import ViTConfig
from tl_vlm.convert.rules import Rule, attention_rules, linear_rules, mlp_rules, norm_rules
from tl_vlm.convert.vits import vit_rules
from tl_vlm.towers.text_encoder import TextEncoderConfig

_TEXT_KINDS = ("clip_text_model", "siglip_text_model", "siglip2_text_model")


def text_encoder_config(tc, d_proj: int) -> TextEncoderConfig:
    """CLIP's text tower (causal, pooled at end-of-text, projection without bias) or SigLIP's (bidirectional,
    pooled at the last position, head with bias; SigLIP 2's is the same)."""
    if tc.model_type not in _TEXT_KINDS:
        raise NotImplementedError(f"text tower {tc.model_type!r} is not supported; tl_vlm converts {list(_TEXT_KINDS)}")
    clip = tc.model_type == "clip_text_model"
    return TextEncoderConfig(
        n_layers=tc.num_hidden_layers,
        d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads,
        d_head=tc.hidden_size // tc.num_attention_heads,
        d_mlp=tc.intermediate_size,
        act_fn=tc.hidden_act,
        normalization_type="LN",
        eps=tc.layer_norm_eps,
        d_vocab=tc.vocab_size,
        n_ctx=tc.max_position_embeddings,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        attention_dir="causal" if clip else "bidirectional",
        positional_embedding_type="standard",
        original_architecture=type(tc).__name__.removesuffix("Config") + "Model",
        hf_config=tc,
        d_proj=d_proj,
        pool="eos" if clip else "last",
        eos_token_id=tc.eos_token_id,
        proj_bias=not clip,
    )


def text_encoder_rules(hf: str, tl: str, cfg: TextEncoderConfig, projection: str) -> list[Rule]:
    """HF ``CLIPTextModel`` / ``SiglipTextModel`` (under ``hf``) -> ``TextEncoder`` (``tl``); ``projection``: the
    HF key of the projection (CLIP's top-level ``text_projection``, SigLIP's ``text_model.head``)."""
    layer, block = rf"{hf}\.encoder\.layers\.(\d+)", rf"{tl}.blocks.\1"
    return [
        Rule(rf"{hf}\.embeddings\.token_embedding\.weight", f"{tl}.embed.W_E"),
        Rule(rf"{hf}\.embeddings\.position_embedding\.weight", f"{tl}.pos_embed.W_pos"),
        *attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head, o="out_proj",
                         biases=("q", "k", "v", "o")),
        *norm_rules(rf"{layer}\.layer_norm1", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.layer_norm2", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", "fc1", "fc2"),
        *norm_rules(rf"{hf}\.final_layer_norm", f"{tl}.ln_final"),
        *linear_rules(projection, f"{tl}.proj.W", f"{tl}.proj.b"),
    ]


def pooled_vit_rules(hf: str, tl: str, cfg: ViTConfig, projection: str | None) -> list[Rule]:
    """HF ``CLIPVisionModel`` / ``SiglipVisionModel`` with its pooling (``post_layernorm``; SigLIP's ``head``) ->
    ``PooledViT``; ``projection``: the HF key of CLIP's ``visual_projection`` (None for SigLIP). SigLIP's head is an
    ``nn.MultiheadAttention``, whose ``in_proj_weight`` / ``in_proj_bias`` ``normalize_in_proj`` renames."""
    head = rf"{hf}\.head"
    return [
        *vit_rules(hf, tl, cfg),
        *norm_rules(rf"{hf}\.post_layernorm", f"{tl}.ln_post"),
        Rule(rf"{head}\.probe", f"{tl}.head.probe", lambda t: t.reshape(-1)),
        *attention_rules(rf"{head}\.attention", f"{tl}.head.attn", cfg.d_head, o="out_proj", qkv="in_proj",
                         biases=("q", "k", "v", "o")),
        *norm_rules(rf"{head}\.layernorm", f"{tl}.head.ln"),
        *mlp_rules(rf"{head}\.mlp", f"{tl}.head.mlp", "fc1", "fc2"),
        *(linear_rules(projection, f"{tl}.proj.W", None) if projection is not None else []),
    ]


def normalize_in_proj(key: str) -> str:
    """``nn.MultiheadAttention``'s fused ``in_proj_weight`` / ``in_proj_bias`` as a module's ``in_proj.weight`` /
    ``.bias`` (the form ``attention_rules(qkv=...)`` reads)."""
    return key.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias")

