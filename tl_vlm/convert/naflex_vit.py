"""SigLIP 2's NaFlex vision tower: HF ``Siglip2VisionConfig`` -> ``ViTConfig``, HF keys -> ``NaFlexViT`` names.

The blocks, post-LN and pooling head are SigLIP's (``dual_encoders.pooled_vit_rules``); only the embedding differs:
a linear patchifier (kept in the conv layout, see ``components/naflex_embed``) and a position grid of
``num_patches`` entries (a square) instead of one position per patch of a fixed image.
"""

from __future__ import annotations

import math

from tl_vlm.config import ViTConfig
from tl_vlm.convert.dual_encoders import pooled_vit_rules
from tl_vlm.convert.rules import Rule
from tl_vlm.convert.vits import encoder_fields


def naflex_vit_config(vc) -> ViTConfig:
    """SigLIP 2 (NaFlex): SigLIP's flags (no class token, no ``ln_pre``, patch bias, attention pooling);
    ``image_size`` is the position grid's native size (``grid * patch_size``), not a size images must have."""
    if vc.model_type != "siglip2_vision_model":
        raise NotImplementedError(f"vision tower {vc.model_type!r} is not a NaFlex tower (siglip2_vision_model)")
    if not vc.vision_use_head:
        raise NotImplementedError("a SigLIP 2 vision tower without its pooling head gives no image embedding")
    if not isinstance(vc.patch_size, int):
        raise NotImplementedError(f"SigLIP 2 with non-square patches {vc.patch_size} is not supported")
    side = math.isqrt(vc.num_patches)
    if side * side != vc.num_patches:
        raise ValueError(f"SigLIP 2's position grid is square; num_patches={vc.num_patches} is not a square number")
    return ViTConfig(
        **encoder_fields(vc),
        n_ctx=vc.num_patches,
        attn_bias=True,
        original_architecture="Siglip2VisionModel",
        image_size=side * vc.patch_size,
        patch_size=vc.patch_size,
        num_channels=vc.num_channels,
        class_token=False,
        patch_bias=True,
        ln_pre=False,
        ln_post=False,
    )


def naflex_vit_rules(hf: str, tl: str, cfg: ViTConfig) -> list[Rule]:
    """HF ``Siglip2VisionModel`` (under ``hf``) -> ``NaFlexViT`` (``tl``). HF's patchifier is a linear over
    ``(p, p, channel)`` pixels; it becomes ``W_patch [d_model, channel, p, p]``, a view of the same storage."""
    p, c = cfg.patch_size, cfg.num_channels
    return [
        Rule(rf"{hf}\.embeddings\.patch_embedding\.weight", f"{tl}.embed.W_patch",
             lambda t: t.unflatten(1, (p, p, c)).permute(0, 3, 1, 2)),
        *pooled_vit_rules(hf, tl, cfg, None),
    ]
