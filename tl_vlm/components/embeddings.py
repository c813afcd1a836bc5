"""Token embedding, unembedding and the ViT patch embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.components import param_layout as layout


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class ScaledEmbed(Embed):
    """Gemma's token embedding: times sqrt(d_model) rounded to the weights' dtype, as HF multiplies (in bfloat16
    sqrt(3072) = 55.43 becomes 55.5)."""

    def __init__(self, d_vocab: int, d_model: int, scale: float):
        super().__init__(d_vocab, d_model)
        self.scale = scale

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E) * torch.tensor(self.scale).to(self.W_E.dtype)


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.W_U = nn.Parameter(layout.empty_in_out(d_model, d_vocab))
        # None until weight processing needs one: a zero bias would cost a full pass over the logits.
        self.register_parameter("b_U", None)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.W_U.T, self.b_U)


def soft_cap(logits: Tensor, cap: float) -> Tensor:
    """Gemma 2's tanh cap on the logits, op for op as HF (``cap <= 0``: none, TL's convention)."""
    return logits if cap <= 0 else torch.tanh(logits / cap) * cap


class PosEmbed(nn.Module):
    """Learned absolute positions (OPT, the Q-Former's text), TL's ``pos_embed.W_pos``."""

    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))

    def forward(self, position_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(position_ids, self.W_pos)


class PatchEmbed(nn.Module):
    """Conv patchifier, with a class token first (CLIP, BLIP-2) or without (SigLIP); positions are added by the tower."""

    def __init__(
        self, d_model: int, patch_size: int, num_channels: int, n_positions: int, bias: bool = False, class_token: bool = True
    ):
        super().__init__()
        self.patch_size = patch_size
        self.W_patch = nn.Parameter(torch.empty(d_model, num_channels, patch_size, patch_size))
        self.b_patch = nn.Parameter(torch.zeros(d_model)) if bias else None  # BLIP-2's and SigLIP's ViTs have one
        self.class_embedding = nn.Parameter(torch.empty(d_model)) if class_token else None
        self.W_pos = nn.Parameter(torch.empty(n_positions, d_model))

    def forward(self, pixel_values: Float[Tensor, "image channel height width"]) -> Float[Tensor, "image pos d_model"]:
        patches = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        if self.class_embedding is None:
            return patches
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1)
