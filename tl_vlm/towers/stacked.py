"""HookedTransformer's stacked weight properties (``model.W_Q`` -> ``[layer, head, d_model, d_head]``)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from tl_vlm.components.gated_cross_block import GatedCrossBlock


class StackedWeights:
    """Mixin for anything with ``blocks``; the tower's own names, as in TL."""

    blocks: torch.nn.ModuleList

    def _stack(self, get) -> Tensor:
        return torch.stack([get(block) for block in self.blocks], dim=0)

    def _self_attention(self, get) -> Tensor:
        """``_stack`` of a self-attention parameter; a block without self-attention (Mllama's ``GatedCrossBlock``)
        reads as zeros: a zero attention adds nothing, so the stack still describes the model, layer by layer."""
        values = [None if isinstance(block, GatedCrossBlock) else get(block) for block in self.blocks]
        like = next(v for v in values if v is not None)
        return torch.stack([like.new_zeros(like.shape) if v is None else v for v in values], dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._self_attention(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._self_attention(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._self_attention(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._self_attention(lambda b: b.attn.W_O)

    def _bias(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """Absent biases read as zeros, as HookedTransformer reports them."""
        return self._self_attention(lambda b: getattr(b.attn, name) if getattr(b.attn, name) is not None else b.attn.W_Q.new_zeros(shape))

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._bias("b_Q", (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._bias("b_K", (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._bias("b_V", (self.cfg.n_heads, self.cfg.d_head))

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._bias("b_O", (self.cfg.d_model,))

    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"] | None:
        return self._stack(lambda b: b.mlp.W_gate) if self.cfg.gated_mlp else None

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[Tensor, "layer d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in if b.mlp.b_in is not None else b.mlp.W_in.new_zeros(self.cfg.d_mlp))

    @property
    def b_out(self) -> Float[Tensor, "layer d_model"]:
        return self._stack(lambda b: b.mlp.b_out if b.mlp.b_out is not None else b.mlp.W_out.new_zeros(self.cfg.d_model))

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the biases written into the residual stream before ``layer`` (TL's definition)."""
        bias = self.blocks[0].mlp.W_out.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            if not isinstance(block, GatedCrossBlock) and block.attn.b_O is not None:
                bias = bias + block.attn.b_O
            if include_mlp_biases and block.mlp.b_out is not None:
                bias = bias + block.mlp.b_out
        attention = layer < self.cfg.n_layers and not isinstance(self.blocks[layer], GatedCrossBlock)
        if mlp_input and attention and self.blocks[layer].attn.b_O is not None:
            bias = bias + self.blocks[layer].attn.b_O
        return bias

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)


class LanguageWeights:
    """Mixin for anything with ``embed`` and ``unembed``: TL's W_E, W_U, b_U."""

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """Absent until weight processing creates it; reads as zeros like HookedTransformer's."""
        b_U = self.unembed.b_U
        return b_U if b_U is not None else self.unembed.W_U.new_zeros(self.unembed.W_U.shape[1])

    def tokens_to_residual_directions(self, tokens: int | Tensor | list[int]) -> Tensor:
        """Unembedding directions of tokens: ``[d_model]`` for one token, ``[..., d_model]`` otherwise."""
        if isinstance(tokens, int) or (isinstance(tokens, Tensor) and tokens.ndim == 0):
            return self.W_U[:, int(tokens)]
        return self.W_U[:, torch.as_tensor(tokens, device=self.W_U.device)].movedim(0, -1)
