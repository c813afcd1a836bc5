"""Pixtral's vision tower: HF ``PixtralVisionConfig`` -> ``PixtralViTConfig``, and HF keys -> TL names."""

from __future__ import annotations

from tl_vlm.config import PixtralViTConfig
from tl_vlm.convert.rules import Rule, attention_rules, mlp_rules, norm_rules
from tl_vlm.towers.pixtral_vision import LN_EPS


def pixtral_vit_config(vc) -> PixtralViTConfig:
    """RMSNorm (eps 1e-5) pre-norm blocks, gated MLP, no biases anywhere, 2D rotary over the whole head."""
    if vc.model_type != "pixtral":
        raise NotImplementedError(f"vision tower {vc.model_type!r} in a Pixtral family; expected 'pixtral'")
    d_head = vc.hidden_size // vc.num_attention_heads  # HF's PixtralAttention ignores config.head_dim
    if d_head % 4:
        raise NotImplementedError(f"Pixtral's 2D rotary needs a head size divisible by 4, got {d_head}")
    return PixtralViTConfig(
        n_layers=vc.num_hidden_layers,
        d_model=vc.hidden_size,
        n_heads=vc.num_attention_heads,
        d_head=d_head,
        d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act,
        normalization_type="RMS",
        eps=LN_EPS,
        n_ctx=(vc.image_size // vc.patch_size) ** 2,
        gated_mlp=True,
        attention_dir="bidirectional",
        original_architecture="PixtralVisionModel",
        hf_config=vc,
        patch_size=vc.patch_size,
        num_channels=vc.num_channels,
        max_image_size=vc.image_size,
    )


def pixtral_vit_rules(hf: str, tl: str, cfg: PixtralViTConfig) -> list[Rule]:
    """HF ``PixtralVisionModel`` (under ``hf``, e.g. ``vision_tower``) -> ``PixtralVisionTower`` (under ``tl``)."""
    layer, block = rf"{hf}\.transformer\.layers\.(\d+)", rf"{tl}.blocks.\1"
    return [
        Rule(rf"{hf}\.patch_conv\.weight", f"{tl}.embed.W_patch"),
        *norm_rules(rf"{hf}\.ln_pre", f"{tl}.ln_pre"),
        Rule(rf"{hf}\.patch_positional_embedding\.inv_freq", f"{tl}.rotary.inv_freq"),  # only an in-memory HF model has it
        *attention_rules(rf"{layer}\.attention", rf"{block}.attn", cfg.d_head),
        *norm_rules(rf"{layer}\.attention_norm", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.ffn_norm", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.feed_forward", rf"{block}.mlp", "up_proj", "down_proj", "gate_proj", bias=False),
    ]
