"""InternViT (``InternVLVisionModel``): HF vision config -> ``InternViTConfig``, HF keys -> TL names."""

from __future__ import annotations

import functools

from tl_vlm.components import param_layout as layout
from tl_vlm.convert.rules import Rule, attention_rules, linear_rules, norm_rules
from tl_vlm.towers.intern_vit import InternViTConfig


def intern_vit_config(vc) -> InternViTConfig:
    if vc.model_type != "internvl_vision":
        raise NotImplementedError(f"vision tower {vc.model_type!r} in an InternVL model; tl_vlm converts 'internvl_vision'")
    if not vc.use_absolute_position_embeddings:
        raise NotImplementedError("InternViT without absolute position embeddings")
    (height, width), (ph, pw) = vc.image_size, vc.patch_size
    if height != width or ph != pw:
        raise NotImplementedError(f"InternViT with non-square images or patches ({vc.image_size}, {vc.patch_size})")
    return InternViTConfig(
        n_layers=vc.num_hidden_layers,
        d_model=vc.hidden_size,
        n_heads=vc.num_attention_heads,
        d_head=vc.hidden_size // vc.num_attention_heads,
        d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act,
        normalization_type={"layer_norm": "LN", "rms_norm": "RMS"}[vc.norm_type],
        eps=vc.layer_norm_eps,
        n_ctx=(height // ph) ** 2 + 1,
        attn_bias=vc.attention_bias,
        attn_out_bias=True,  # projection_layer always has a bias
        mlp_bias=True,
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        original_architecture="InternVLVisionModel",
        hf_config=vc,
        image_size=height,
        patch_size=ph,
        num_channels=vc.num_channels,
        class_token=True,
        patch_bias=True,
        ln_pre=False,
        ln_post=not vc.use_mean_pooling,  # HF's final ``layernorm`` (an Identity with mean pooling)
        width_qk_norm=vc.use_qk_norm,
    )


def intern_vit_rules(hf: str, tl: str, cfg: InternViTConfig) -> list[Rule]:
    """HF ``InternVLVisionModel`` (under ``hf``) -> ``InternViTTower`` (under ``tl``)."""
    layer, block = rf"{hf}\.encoder\.layer\.(\d+)", rf"{tl}.blocks.\1"
    # Listed first: the first matching rule wins, and attention_rules would place projection_layer as W_O.
    return [
        Rule(rf"{hf}\.embeddings\.cls_token", f"{tl}.embed.class_embedding", lambda t: t.reshape(-1)),
        Rule(rf"{hf}\.embeddings\.patch_embeddings\.projection\.weight", f"{tl}.embed.W_patch"),
        Rule(rf"{hf}\.embeddings\.patch_embeddings\.projection\.bias", f"{tl}.embed.b_patch"),
        Rule(rf"{hf}\.embeddings\.position_embeddings", f"{tl}.embed.W_pos", lambda t: t[0]),
        # The attention's and MLP's output weights load unscaled (HF's); W_O / W_out read them scaled.
        Rule(rf"{layer}\.attention\.projection_layer\.weight", rf"{block}.attn.W_O_unscaled",
             functools.partial(layout.heads_out, d_head=cfg.d_head)),
        Rule(rf"{layer}\.attention\.projection_layer\.bias", rf"{block}.attn.b_O_unscaled"),
        *attention_rules(rf"{layer}\.attention", rf"{block}.attn", cfg.d_head, o="projection_layer",
                          biases=("q", "k", "v") if cfg.attn_bias else ()),
        Rule(rf"{layer}\.mlp\.fc2\.weight", rf"{block}.mlp.W_out_unscaled", layout.transposed),
        Rule(rf"{layer}\.mlp\.fc2\.bias", rf"{block}.mlp.b_out_unscaled"),
        *norm_rules(rf"{layer}\.attention\.q_norm", rf"{block}.attn.q_norm"),
        *norm_rules(rf"{layer}\.attention\.k_norm", rf"{block}.attn.k_norm"),
        Rule(rf"{layer}\.lambda_1", rf"{block}.attn.layer_scale"),
        Rule(rf"{layer}\.lambda_2", rf"{block}.mlp.layer_scale"),
        *norm_rules(rf"{layer}\.layernorm_before", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.layernorm_after", rf"{block}.ln2"),
        *linear_rules(rf"{layer}\.mlp\.fc1", rf"{block}.mlp.W_in", rf"{block}.mlp.b_in"),
        *norm_rules(rf"{hf}\.layernorm", f"{tl}.ln_post"),
    ]


def intern_vit_ignored(hf: str) -> list[str]:
    """The mask token serves only masked-image pretraining (``bool_masked_pos``)."""
    return [rf"{hf}\.embeddings\.mask_token"]
