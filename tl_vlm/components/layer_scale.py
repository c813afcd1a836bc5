"""Layer scale (InternViT's ``lambda_1`` / ``lambda_2``, timm's ``ls1`` / ``ls2``): the attention's and the MLP's
outputs are scaled per channel before they join the residual stream, ``layer_scale * (z W_O + b_O)``.

The forward computes exactly that from HF's own weights (``W_O_unscaled``, ``b_O_unscaled``, ``W_out_unscaled``,
``b_out_unscaled``, views of HF's storage), so half precision stays HF's bit for bit. TransformerLens' names mean
what writes into the residual stream: ``W_O``, ``b_O``, ``W_out`` and ``b_out`` are the scaled (effective)
weights, so ``hook_result``, ``OV``, TL's ``stack_head_results`` / ``get_neuron_results`` and every decomposition
are exact. Weight processing that writes ``b_O`` / ``W_out`` ... writes the unscaled weights it implies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components import param_layout as layout
from tl_vlm.components.attention import Attention
from tl_vlm.components.hooks import active, editing, run_hook
from tl_vlm.components.mlp import MLP
from tl_vlm.config import TowerConfig


class _Scaled:
    """TL-named effective weights over unscaled parameters: reading gives ``unscaled * layer_scale``, writing
    (weight processing) stores ``value / layer_scale``."""

    _SCALED: tuple[str, ...] = ()

    def _unscale(self, name: str, value: Tensor) -> nn.Parameter:
        scale = self.layer_scale.detach()
        if not bool(scale.all()):
            raise ValueError(f"cannot write {name}: a layer-scale channel is zero, so the unscaled weight is undefined")
        return nn.Parameter(value.detach() / scale, requires_grad=value.requires_grad)

    def __setattr__(self, name: str, value) -> None:
        if name in self._SCALED and value is None:
            name = f"{name}_unscaled"
        elif name in self._SCALED and "layer_scale" in self._parameters and isinstance(value, Tensor):
            value, name = self._unscale(name, value), f"{name}_unscaled"
        super().__setattr__(name, value)


class LayerScaleAttention(_Scaled, Attention):
    _SCALED = ("W_O", "b_O")

    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__(cfg, layer)
        self.W_O_unscaled = self._parameters.pop("W_O")
        self.b_O_unscaled = self._parameters.pop("b_O", None)
        self.layer_scale = nn.Parameter(torch.ones(cfg.d_model))

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return self.W_O_unscaled * self.layer_scale

    @property
    def b_O(self) -> Float[Tensor, " d_model"] | None:
        return None if self.b_O_unscaled is None else self.b_O_unscaled * self.layer_scale

    def _output(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        if active(self.hook_result) or self.cfg.use_attn_result:
            result = run_hook(self.hook_result, torch.einsum("bphd,hdm->bphm", z, self.W_O))
            if editing(self.hook_result) or z.dtype == self.cfg.dtype == torch.float32:
                out = result.sum(2)
                return out if self.b_O is None else out + self.b_O
        out = F.linear(z.reshape(*z.shape[:2], -1), layout.heads_out_linear(self.W_O_unscaled), self.b_O_unscaled)
        return self.layer_scale * out


class LayerScaleMLP(_Scaled, MLP):
    _SCALED = ("W_out", "b_out")

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, gated: bool, bias: bool):
        super().__init__(d_model, d_mlp, act_fn, gated, bias)
        self.W_out_unscaled = self._parameters.pop("W_out")
        self.b_out_unscaled = self._parameters.pop("b_out", None)
        self.layer_scale = nn.Parameter(torch.ones(d_model))

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.W_out_unscaled * self.layer_scale

    @property
    def b_out(self) -> Float[Tensor, " d_model"] | None:
        return None if self.b_out_unscaled is None else self.b_out_unscaled * self.layer_scale

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.W_gate is None:
            post = self.act(run_hook(self.hook_pre, F.linear(x, self.W_in.T, self.b_in)))
        else:
            pre = run_hook(self.hook_pre, F.linear(x, self.W_gate.T, self.b_gate))
            post = self.act(pre) * run_hook(self.hook_pre_linear, F.linear(x, self.W_in.T, self.b_in))
        post = run_hook(self.hook_post, post)
        return self.layer_scale * F.linear(post, self.W_out_unscaled.T, self.b_out_unscaled)
