"""Vision towers: HF vision config -> tower config, and HF keys -> TL names, per ViT kind.

- ``vit_config`` / ``vit_rules``: CLIP, SigLIP and BLIP-2's EVA ViT (learned positions, pre-norm LayerNorm
  blocks), one ``ViTConfig`` that says which parts each has (class token, ``ln_pre``, ``ln_post``, patch bias).
- ``qwen_vit_config`` / ``qwen_vit_rules``: Qwen2-VL and Qwen2.5-VL (fused qkv, 2D rotary, no positions table).
"""

from __future__ import annotations

from tl_vlm.config import TowerConfig, ViTConfig
from tl_vlm.convert.rules import Rule, attention_rules, mlp_rules, norm_rules

_VIT_KINDS = ("clip_vision_model", "siglip_vision_model", "blip_2_vision_model", "instructblip_vision_model")


def encoder_fields(vc) -> dict:
    """The ViTConfig fields every HF ViT encoder config gives the same way (pre-norm LayerNorm blocks with biases,
    bidirectional attention, learned positions)."""
    return dict(
        n_layers=vc.num_hidden_layers,
        d_model=vc.hidden_size,
        n_heads=vc.num_attention_heads,
        d_head=vc.hidden_size // vc.num_attention_heads,
        d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act,
        normalization_type="LN",
        eps=vc.layer_norm_eps,
        attn_out_bias=True,
        mlp_bias=True,
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        hf_config=vc,
    )


def vit_config(vc) -> ViTConfig:
    """CLIP (class token, ``ln_pre``), SigLIP (no class token, no ``ln_pre``, patch bias) or EVA (BLIP-2's:
    class token, patch bias, optional q/v biases, ``ln_post``)."""
    kind = vc.model_type
    if kind not in _VIT_KINDS:
        raise NotImplementedError(f"vision tower {kind!r} is not supported yet; tl_vlm converts {list(_VIT_KINDS)}")
    clip, siglip = kind == "clip_vision_model", kind == "siglip_vision_model"
    eva = not (clip or siglip)
    return ViTConfig(
        **encoder_fields(vc),
        n_ctx=(vc.image_size // vc.patch_size) ** 2 + (not siglip),
        attn_bias=vc.qkv_bias if eva else True,
        original_architecture=type(vc).__name__.removesuffix("Config") + "Model",
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        num_channels=getattr(vc, "num_channels", 3),
        class_token=not siglip,
        patch_bias=not clip,
        ln_pre=clip,
        ln_post=eva,
    )


def vit_rules(hf: str, tl: str, cfg: ViTConfig) -> list[Rule]:
    """HF ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Blip2VisionModel`` (under ``hf``) -> ``ViTTower`` (under
    ``tl``); rules for parts a flavour lacks (class token, ``pre_layrnorm``, patch bias) simply match nothing."""
    layer, block = rf"{hf}\.encoder\.layers\.(\d+)", rf"{tl}.blocks.\1"
    eva = cfg.class_token and cfg.patch_bias
    if eva:  # one fused [q; k; v]; its bias is HF's cat(q_bias, zeros, v_bias), loaded as stored
        attention = attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head, o="projection", qkv="qkv",
                                    biases=("q", "k", "v", "o") if cfg.attn_bias else ("o",))
    else:
        attention = attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head, o="out_proj",
                                    biases=("q", "k", "v", "o"))
    return [
        # EVA stores the class token as [1, 1, d] and the positions as [1, pos, d].
        Rule(rf"{hf}\.embeddings\.class_embedding", f"{tl}.embed.class_embedding", lambda t: t.reshape(-1)),
        Rule(rf"{hf}\.embeddings\.patch_embedding\.weight", f"{tl}.embed.W_patch"),
        Rule(rf"{hf}\.embeddings\.patch_embedding\.bias", f"{tl}.embed.b_patch"),
        Rule(rf"{hf}\.embeddings\.position_embedding\.weight", f"{tl}.embed.W_pos"),
        Rule(rf"{hf}\.embeddings\.position_embedding", f"{tl}.embed.W_pos", lambda t: t[0]),
        *norm_rules(rf"{hf}\.pre_layrnorm", f"{tl}.ln_pre"),
        *attention,
        *norm_rules(rf"{layer}\.layer_norm1", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.layer_norm2", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", "fc1", "fc2"),
        *(norm_rules(rf"{hf}\.post_layernorm", f"{tl}.ln_post") if cfg.ln_post else []),
    ]


def vit_ignored(hf: str) -> list[str]:
    """CLIP's post-LN and SigLIP's pooling head serve only the vision model's own pooled output."""
    return [rf"{hf}\.post_layernorm\.(weight|bias)", rf"{hf}\.head\..*"]


def qwen_vit_config(vc) -> TowerConfig:
    """Qwen2-VL (LayerNorm, QuickGELU MLP of ``mlp_ratio``) or Qwen2.5-VL (RMSNorm, gated SiLU MLP)."""
    qwen25 = vc.model_type == "qwen2_5_vl_vision"
    d = vc.hidden_size if qwen25 else vc.embed_dim
    return TowerConfig(
        n_layers=vc.depth, d_model=d, n_heads=vc.num_heads, d_head=d // vc.num_heads,
        d_mlp=vc.intermediate_size if qwen25 else int(d * vc.mlp_ratio), act_fn=vc.hidden_act,
        normalization_type="RMS" if qwen25 else "LN", eps=1e-6, gated_mlp=qwen25, attn_bias=True,
        attn_out_bias=True, mlp_bias=True, attention_dir="bidirectional", original_architecture=type(vc).__name__,
        hf_config=vc,
    )


def qwen_vit_rules(hf: str, tl: str, cfg: TowerConfig) -> list[Rule]:
    """HF Qwen2-VL / Qwen2.5-VL vision blocks (under ``hf``, e.g. ``visual``) -> ``QwenVisionTower`` (``tl``)."""
    layer, block = rf"{hf}\.blocks\.(\d+)", rf"{tl}.blocks.\1"
    mlp = ("up_proj", "down_proj", "gate_proj") if cfg.gated_mlp else ("fc1", "fc2")
    return [
        Rule(rf"{hf}\.patch_embed\.proj\.weight", f"{tl}.embed.W_patch"),
        Rule(rf"{hf}\.rotary_pos_emb\.inv_freq", f"{tl}.rotary.inv_freq"),  # only an in-memory HF model has it
        *attention_rules(rf"{layer}\.attn", rf"{block}.attn", cfg.d_head, o="proj", qkv="qkv", biases=("q", "k", "v", "o")),
        *norm_rules(rf"{layer}\.norm1", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.norm2", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", *mlp),
    ]


def qwen3_vit_config(vc) -> TowerConfig:
    """Qwen3-VL's vision blocks: LayerNorm, GELU(tanh) MLP, biases everywhere, bidirectional attention."""
    d = vc.hidden_size
    return TowerConfig(
        n_layers=vc.depth, d_model=d, n_heads=vc.num_heads, d_head=d // vc.num_heads, d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act, normalization_type="LN", eps=1e-6, attn_bias=True, attn_out_bias=True, mlp_bias=True,
        attention_dir="bidirectional", original_architecture=type(vc).__name__, hf_config=vc,
    )


def qwen3_vit_rules(hf: str, tl: str, cfg: TowerConfig) -> list[Rule]:
    """HF Qwen3-VL vision model (under ``hf``) -> ``Qwen3VisionTower`` (``tl``); mergers are the projector's."""
    layer, block = rf"{hf}\.blocks\.(\d+)", rf"{tl}.blocks.\1"
    return [
        Rule(rf"{hf}\.patch_embed\.proj\.weight", f"{tl}.embed.W_patch"),
        Rule(rf"{hf}\.patch_embed\.proj\.bias", f"{tl}.embed.b_patch"),
        Rule(rf"{hf}\.pos_embed\.weight", f"{tl}.W_pos"),
        Rule(rf"{hf}\.rotary_pos_emb\.inv_freq", f"{tl}.rotary.inv_freq"),  # only an in-memory HF model has it
        *attention_rules(rf"{layer}\.attn", rf"{block}.attn", cfg.d_head, o="proj", qkv="qkv", biases=("q", "k", "v", "o")),
        *norm_rules(rf"{layer}\.norm1", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.norm2", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", "linear_fc1", "linear_fc2"),
    ]
