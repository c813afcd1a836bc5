"""Tower configs whose field names follow HookedTransformerConfig, so TL tools read them unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class TowerConfig:
    """One transformer tower (vision encoder, Q-Former, language model) in TransformerLens' vocabulary."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    act_fn: str
    normalization_type: str  # "LN", "LNPre", "RMS", "RMSPre"
    eps: float
    n_key_value_heads: Optional[int] = None
    d_vocab: int = -1
    n_ctx: int = 2048
    gated_mlp: bool = False
    attn_bias: bool = False  # biases on W_Q/W_K/W_V
    attn_out_bias: bool = False  # bias on W_O
    mlp_bias: bool = False
    attention_dir: str = "causal"  # or "bidirectional"
    use_attn_scale: bool = True  # scores scaled by d_head**-0.5 (False: T5)
    positional_embedding_type: str = "rotary"  # "rotary" or "standard" (learned)
    rotary_base: float = 10000.0
    rotary_dim: Optional[int] = None
    sliding_window: Optional[int] = None
    final_rms: bool = False
    original_architecture: str = ""
    model_name: str = ""
    dtype: torch.dtype = torch.float32
    device: Optional[str] = None
    # Fields TL tools read; fixed for the architectures converted here.
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}")

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_key_value_heads)
        mlp = self.d_model * self.d_mlp * (3 if self.gated_mlp else 2)
        return self.n_layers * (attn + mlp)

    def replace(self, **changes) -> "TowerConfig":
        return replace(self, **changes)


@dataclass
class VLMConfig:
    """How the towers of one VLM are wired: which vision layers feed the projector, image token id, etc."""

    architecture: str
    family: str
    language: TowerConfig
    vision: TowerConfig
    image_token_id: int
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    projector_act: str = "gelu"
    projector_bias: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def feature_layers(self) -> list[int]:
        """Vision feature layers as non-negative hidden-state indices (0 = input of block 0)."""
        layers = [self.vision_feature_layer] if isinstance(self.vision_feature_layer, int) else self.vision_feature_layer
        n = self.vision.n_layers + 1
        return [layer % n for layer in layers]
