"""ViT vision tower: patch (+ class) embedding, learned positions, pre-norm blocks (CLIP, SigLIP, EVA).

CLIP normalises the embeddings (``ln_pre``); BLIP-2's EVA ViT does not, has a patch-conv bias and
normalises the last hidden state instead (``ln_post``, applied by the family that reads it). SigLIP has
the patch bias, no class token and no ``ln_pre``; its post-LN and pooling head serve only its own pooled output.
Hidden state ``j`` is the input of block ``j`` (``j = 0`` is the embedding, after ``ln_pre``), as in HF's
``hidden_states``. Blocks after the deepest feature layer the VLM reads run only when one of their
hooks is attached: they cannot change the output, and skipping them is free speed.
"""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import PatchEmbed, TransformerBlock, make_norm
from tl_vlm.components.hooks import active, run_hook
from tl_vlm.config import ViTConfig
from tl_vlm.towers.hidden_states import kept_hidden_states
from tl_vlm.towers.stacked import StackedWeights


class ViTTower(StackedWeights, nn.Module):
    block: type[nn.Module] = TransformerBlock  # InternViT's blocks add layer scale

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg, self.image_size = cfg, cfg.image_size
        n_positions = cfg.grid**2 + cfg.class_token
        self.embed = PatchEmbed(
            cfg.d_model, cfg.patch_size, cfg.num_channels, n_positions, bias=cfg.patch_bias, class_token=cfg.class_token
        )
        self.hook_embed = HookPoint()  # [image, (1 +) patch, d_model]: the class token (if any), then patches
        self.hook_pos_embed = HookPoint()
        self.ln_pre = make_norm("LN", cfg.d_model, cfg.eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList([self.block(cfg, i) for i in range(cfg.n_layers)])
        self.ln_post = make_norm("LN", cfg.d_model, cfg.eps) if cfg.ln_post else None

    def forward(
        self, pixel_values: Float[Tensor, "image channel height width"], keep: list[int]
    ) -> dict[int, Float[Tensor, "image pos d_model"]]:
        """Hidden states with the requested indices (0..n_layers)."""
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vision tower expects pixel_values [image, channel, {self.image_size}, {self.image_size}], got "
                f"{tuple(pixel_values.shape)}; resize with the model's processor (model.prepare)"
            )
        x = run_hook(self.hook_embed, self.embed(pixel_values))
        pos = self.embed.W_pos
        if active(self.hook_pos_embed):  # a copy: an in-place hook must not write into W_pos
            pos = run_hook(self.hook_pos_embed, pos.expand(x.shape[0], -1, -1).clone())
        resid = x + pos if self.ln_pre is None else self.ln_pre(x + pos)
        return kept_hidden_states(self.blocks, resid, keep)
