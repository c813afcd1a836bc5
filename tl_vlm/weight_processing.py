"""TransformerLens weight processing on HookedVLM towers.

Every function writes new tensors (never edits in place), so a model converted with
``from_hf_model`` never changes the HF model whose storage it shares.

- fold_ln: norm weights (and LN biases) move into the next linear map; norms become LNPre/RMSPre.
  Language tower and vision blocks. The vision ``ln_pre`` stays: its output *is* the residual stream.
- center_writing_weights: writers into the residual stream get zero mean. Only where every reader is
  a LayerNorm (mean-invariant): language towers with LN. RMSNorm towers and the vision tower, whose
  raw residual feeds the projector, are left alone with a warning.
- center_unembed: W_U gets zero mean over the vocabulary (logits shift per position, softmax unchanged). Refused
  where the logits are soft-capped (Gemma 2): tanh is not shift-invariant.
- fold_value_biases: b_V moves into b_O (patterns sum to one).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch import Tensor

from tl_vlm.components.moe import MoE


def process(model, fold_ln: bool, center_writing_weights: bool, center_unembed: bool, fold_value_biases: bool) -> None:
    if "language" not in model.towers():  # encoder-decoder language models list "encoder" and "decoder"
        if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
            raise NotImplementedError("weight processing of encoder-decoder language models (T5) is not implemented yet")
        return
    if model.capabilities.cross_attention and (fold_ln or center_writing_weights or center_unembed or fold_value_biases):
        raise NotImplementedError(
            "weight processing of language models with cross-attention layers (Mllama) is not implemented yet; load "
            "without fold_ln / center_writing_weights / center_unembed / fold_value_biases"
        )
    if center_unembed and model.cfg.output_logits_soft_cap > 0:
        raise ValueError(
            f"center_unembed=True is refused: this model caps its logits (tanh, output_logits_soft_cap="
            f"{model.cfg.output_logits_soft_cap}), and a capped softmax is not invariant to shifting the logits, so "
            "centering W_U would change the output distribution; load with center_unembed=False"
        )
    towers = [model.towers()[name] for name in ("language", "vision")]
    if fold_ln:
        for tower in towers:
            if tower.cfg.normalization_type.endswith("Pre"):
                warnings.warn(f"fold_ln skipped on {type(tower).__name__}: its norms are already folded")
            else:
                fold_layer_norms(tower, final=tower is model.language)
    if center_writing_weights:
        if model.cfg.normalization_type in ("LN", "LNPre"):
            center_writing(model.language)
        else:
            warnings.warn(
                f"center_writing_weights skipped: the language tower uses {model.cfg.normalization_type}, which is not "
                "invariant to shifting the residual stream's mean"
            )
    if center_unembed:
        unembed = model.language.unembed
        _replace(unembed, "W_U", unembed.W_U - unembed.W_U.mean(-1, keepdim=True))
        if unembed.b_U is not None:
            _replace(unembed, "b_U", unembed.b_U - unembed.b_U.mean())
    if fold_value_biases:
        for tower in towers:
            fold_value_bias(tower)


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    """Set a parameter to ``value`` in new storage with the old parameter's strides (keeps the fast layout)."""
    old = getattr(module, name)
    like = old if old is not None else value
    new = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
    new.copy_(value.detach())
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True))


def _fold_into(norm: nn.Module, targets: list[tuple[nn.Module, str, str | None, int]]) -> None:
    """Fold ``norm``'s weight (and bias) into the input dimension ``dim`` of each (module, weight, bias)."""
    w = norm.w.detach()
    b = getattr(norm, "b", None)
    for module, w_name, b_name, dim in targets:
        weight = getattr(module, w_name).detach()
        shape = [1] * weight.ndim
        shape[dim] = -1
        if b is not None and b_name is not None:
            shift = torch.tensordot(b.detach(), weight, dims=([0], [dim]))
            bias = getattr(module, b_name)
            _replace(module, b_name, shift if bias is None else bias.detach() + shift)
        _replace(module, w_name, weight * w.view(shape))
    norm.w = None
    if b is not None:
        norm.b = None


def fold_layer_norms(tower, final: bool) -> None:
    for block in tower.blocks:
        attn, mlp = block.attn, block.mlp
        _fold_into(block.ln1, [(attn, "W_Q", "b_Q", 1), (attn, "_W_K", "_b_K", 1), (attn, "_W_V", "_b_V", 1)])
        if isinstance(mlp, MoE):  # the router and every expert read the normalised stream
            _fold_into(block.ln2, [(mlp, "W_router", None, 0), *((e, w, None, 0) for e in mlp.experts for w in ("W_in", "W_gate"))])
            continue
        mlp_targets = [(mlp, "W_in", "b_in", 0)]
        if mlp.W_gate is not None:
            mlp_targets.append((mlp, "W_gate", "b_gate", 0))
        _fold_into(block.ln2, mlp_targets)
    if final:
        _fold_into(tower.ln_final, [(tower.unembed, "W_U", "b_U", 0)])
    tower.cfg.normalization_type = tower.cfg.normalization_type.removesuffix("Pre") + "Pre"


def center_writing(tower) -> None:
    embed = tower.embed
    _replace(embed, "W_E", embed.W_E - embed.W_E.mean(-1, keepdim=True))
    if tower.cfg.positional_embedding_type == "standard":  # learned positions (OPT) write into the stream too
        _replace(tower.pos_embed, "W_pos", tower.pos_embed.W_pos - tower.pos_embed.W_pos.mean(-1, keepdim=True))
    for block in tower.blocks:
        attn, mlp = block.attn, block.mlp
        _replace(attn, "W_O", attn.W_O - attn.W_O.mean(-1, keepdim=True))
        if attn.b_O is not None:
            _replace(attn, "b_O", attn.b_O - attn.b_O.mean())
        _replace(mlp, "W_out", mlp.W_out - mlp.W_out.mean(-1, keepdim=True))
        if mlp.b_out is not None:
            _replace(mlp, "b_out", mlp.b_out - mlp.b_out.mean())


def fold_value_bias(tower) -> None:
    for block in tower.blocks:
        attn = block.attn
        if attn._b_V is None:
            continue
        shift = torch.einsum("hd,hdm->m", attn.b_V.detach(), attn.W_O.detach())
        _replace(attn, "b_O", shift if attn.b_O is None else attn.b_O.detach() + shift)
        _replace(attn, "_b_V", torch.zeros_like(attn._b_V))
