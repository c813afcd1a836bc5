"""Hooked building blocks shared by every tower."""

from tl_vlm.components.attention import Attention
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.embeddings import Embed, PatchEmbed, PosEmbed, Unembed
from tl_vlm.components.kv_cache import KVCache
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import LayerNorm, RMSNorm, make_norm
from tl_vlm.components.rotary import Rotary

__all__ = [
    "Attention",
    "Embed",
    "KVCache",
    "LayerNorm",
    "MLP",
    "PatchEmbed",
    "PosEmbed",
    "RMSNorm",
    "Rotary",
    "TransformerBlock",
    "Unembed",
    "make_norm",
]
