"""InternViT (InternVL's vision tower): a ViT with a class token and learned positions (no pre-LN), LayerNorm or
RMSNorm blocks with layer scale (``components/layer_scale``), and, in InternViT-6B, QK-norm over the whole
projection width (``components/width_qk_norm``). Hooks are ViTTower's: ``vision.hook_embed`` [tile, 1 + patch,
d], per-block and per-head hooks, ``vision.blocks.{i}.attn.q_norm|k_norm.*`` where the config has QK-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.layer_scale import LayerScaleAttention, LayerScaleMLP
from tl_vlm.components.width_qk_norm import WidthRMSNorm
from tl_vlm.config import ViTConfig
from tl_vlm.towers.vision import ViTTower


@dataclass
class InternViTConfig(ViTConfig):
    width_qk_norm: bool = False  # RMSNorm over all heads' q (k) together (InternViT-6B)
    qk_norm_eps: float = 1e-6  # HF builds the QK-norm with its default eps, not layer_norm_eps


class InternViTBlock(TransformerBlock):
    """A ViT block whose attention and MLP carry layer scale (``attn.layer_scale``, ``mlp.layer_scale``)."""

    def __init__(self, cfg: InternViTConfig, layer: int):
        super().__init__(cfg, layer)
        self.attn = LayerScaleAttention(cfg, layer)
        self.mlp = LayerScaleMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, cfg.mlp_bias)
        if cfg.width_qk_norm:
            self.attn.q_norm = WidthRMSNorm(cfg.d_model, cfg.qk_norm_eps)
            self.attn.k_norm = WidthRMSNorm(cfg.d_model, cfg.qk_norm_eps)


class InternViTTower(ViTTower):
    block = InternViTBlock
    cfg: InternViTConfig
