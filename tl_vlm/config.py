"""Tower configs whose field names follow HookedTransformerConfig, so TL tools read them unchanged."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

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
    scale_queries: bool = False  # the scale multiplies the projected queries, not the scores (OPT, as HF's)
    positional_embedding_type: str = "rotary"  # "rotary" or "standard" (learned)
    rotary_base: float = 10000.0
    rotary_dim: Optional[int] = None
    sliding_window: Optional[int] = None
    use_qk_norm: bool = False  # RMSNorm over d_head on each query / key head before rotary (Qwen3, Gemma 3), as TL
    deepstack_layers: int = 0  # the first blocks whose outputs get visual features added (Qwen3-VL's DeepStack)
    # Gemma (TL's names): scores divided by attn_scale (-1: sqrt(d_head)); tanh soft caps (-1: none) on the attention
    # scores and the logits; norms before and after each sublayer; per-layer "global" / "local" (sliding) attention.
    attn_scale: float = -1.0
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_normalization_before_and_after: bool = False
    attn_types: Optional[list[str]] = None
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
    tie_word_embeddings: bool = False
    # The HF (text / vision) config this tower was converted from; rotary embeddings read their settings from it.
    hf_config: Any = None

    @property
    def d_vocab_out(self) -> int:
        """TL's output vocabulary (the unembedding's width), the input vocabulary here."""
        return self.d_vocab

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
class ViTConfig(TowerConfig):
    """A ViT with patch embeddings and learned positions (CLIP, SigLIP, BLIP-2's EVA): which parts it has."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    class_token: bool = True
    patch_bias: bool = False  # SigLIP, EVA
    ln_pre: bool = True  # CLIP normalises the embeddings
    ln_post: bool = False  # EVA normalises the last hidden state (the Q-Former reads it)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class PixtralViTConfig(TowerConfig):
    """Pixtral's native-resolution ViT: no positions table (2D rotary), images of any size up to ``max_image_size``."""

    patch_size: int = 16
    num_channels: int = 3
    max_image_size: int = 1024  # longest edge the processor resizes to (HF's ``image_size``)


@dataclass
class QFormerConfig(TowerConfig):
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    d_vision: int = 0  # width of the image features the queries cross-attend to


@dataclass
class T5Config(TowerConfig):
    """A T5 stack pair: the encoder's shape, plus what only T5 has."""

    n_decoder_layers: int = 0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_decoder_outputs: bool = True  # tied-embedding T5 rescales by d_model**-0.5 before its unembedding
    decoder_start_token_id: int = 0


@dataclass
class VLMConfig:
    """What every VLM has: its towers and where image features enter the language stream. Each family extends
    it with a typed config of its own (families/*.py)."""

    architecture: str
    family: str
    language: TowerConfig
    vision: TowerConfig
    image_token_id: int | None
    hf_config: Any  # the checkpoint's config; the HF helpers that fix HF's token order read it

    def towers(self) -> list[TowerConfig]:
        return [self.language, self.vision]


@dataclass
class ViTVLMConfig(VLMConfig):
    """A VLM whose vision tower is a fixed-size ViT (LLaVA, BLIP-2): its image and patch sizes are the VLM's."""

    vision: ViTConfig

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size
