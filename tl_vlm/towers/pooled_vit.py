"""Vision tower of a dual encoder: the ViT (``ViTTower``) plus its pooling and projection into the shared space.

CLIP pools the class token through ``ln_post`` (HF's ``post_layernorm``) and projects it (``visual_projection``,
no bias). SigLIP normalises every patch (``ln_post``) and pools them with its attention-pooling head
(``head``: one probe query; HF's ``SiglipMultiheadAttentionPoolingHead``), with no projection after it.
Hooks beyond the ViT's: ``vision.ln_post.*``, ``vision.head.*`` (SigLIP), ``vision.hook_pooled`` ``[image,
d_model]`` and ``vision.hook_embed_out`` ``[image, d_proj]`` (the image embedding before normalisation).
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import make_norm
from tl_vlm.components.attention_pool import AttentionPool
from tl_vlm.components.hooks import run_hook
from tl_vlm.components.projection import Projection
from tl_vlm.config import ViTConfig
from tl_vlm.towers.vision import ViTTower


class PooledViT(ViTTower):
    def __init__(self, cfg: ViTConfig, pool: str, d_proj: int | None):
        """``pool``: "cls" (CLIP) or "map" (SigLIP's attention pooling); ``d_proj``: the projection's width (None:
        no projection, SigLIP)."""
        super().__init__(cfg)
        self.pool = pool
        self.ln_post = make_norm("LN", cfg.d_model, cfg.eps)
        self.head = AttentionPool(cfg) if pool == "map" else None
        self.hook_pooled = HookPoint()  # [image, d_model]
        self.proj = Projection(cfg.d_model, d_proj, bias=False) if d_proj is not None else None
        self.hook_embed_out = HookPoint()  # [image, d_proj]

    def encode(self, pixel_values: Float[Tensor, "image channel height width"]) -> Float[Tensor, "image d_proj"]:
        last = self(pixel_values, keep=[self.cfg.n_layers])[self.cfg.n_layers]
        if self.head is None:
            pooled = self.ln_post(last[:, 0])
        else:
            pooled = self.head(self.ln_post(last))
        pooled = run_hook(self.hook_pooled, pooled)
        return run_hook(self.hook_embed_out, pooled if self.proj is None else self.proj(pooled))
