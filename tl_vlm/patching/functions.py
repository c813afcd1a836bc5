"""TL's ``get_act_patch_*`` functions on the batched sweep: same arguments, same tensors, plus ``batch_size``
(cells per forward) and ``reuse_prefix`` (the first-position shortcut, prefix.py)."""

from __future__ import annotations

from functools import partial

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.patching import (
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
)

from tl_vlm.patching.sweep import generic_activation_patch


def _sweep(setter, activation_name: str, axes: tuple[str, ...], doc: str):
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=activation_name, index_axis_names=axes)
    fn.__doc__ = f"{doc} As TL's function of the same name; shape [{', '.join(axes)}]."
    return fn


get_act_patch_resid_pre = _sweep(layer_pos_patch_setter, "resid_pre", ("layer", "pos"), "The residual stream entering each block, by position.")
get_act_patch_resid_mid = _sweep(layer_pos_patch_setter, "resid_mid", ("layer", "pos"), "The residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _sweep(layer_pos_patch_setter, "attn_out", ("layer", "pos"), "Each attention layer's output, by position.")
get_act_patch_mlp_out = _sweep(layer_pos_patch_setter, "mlp_out", ("layer", "pos"), "Each MLP's output, by position.")

get_act_patch_attn_head_out_by_pos = _sweep(layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"), "Each head's output (z), by position.")
get_act_patch_attn_head_q_by_pos = _sweep(layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"), "Each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _sweep(layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"), "Each key head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _sweep(layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"), "Each value head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _sweep(layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"), "Each head's pattern row of each destination.")

get_act_patch_attn_head_out_all_pos = _sweep(layer_head_vector_patch_setter, "z", ("layer", "head"), "Each head's output (z) at every position.")
get_act_patch_attn_head_q_all_pos = _sweep(layer_head_vector_patch_setter, "q", ("layer", "head"), "Each head's queries at every position.")
get_act_patch_attn_head_k_all_pos = _sweep(layer_head_vector_patch_setter, "k", ("layer", "head"), "Each key head's keys at every position.")
get_act_patch_attn_head_v_all_pos = _sweep(layer_head_vector_patch_setter, "v", ("layer", "head"), "Each value head's values at every position.")
get_act_patch_attn_head_pattern_all_pos = _sweep(layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"), "Each head's whole pattern.")


def _pad_heads(result: Tensor, like: Tensor) -> Tensor:
    """K/V results of a grouped-query model padded to the query heads, as TL pads them."""
    return torch.nn.functional.pad(result, (0, like.size(-1) - result.size(-1)))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Float[Tensor, "patch_type layer head"]:
    """TL's: output, query, key, value and pattern of every head at all positions, stacked [5, layer, head]."""
    out = get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    q = get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    k = _pad_heads(get_act_patch_attn_head_k_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs), q)
    v = _pad_heads(get_act_patch_attn_head_v_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs), q)
    pattern = get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    return torch.stack([out, q, k, v, pattern])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Float[Tensor, "patch_type layer pos head"]:
    """TL's: output, query, key, value and pattern of every head by position, stacked [5, layer, pos, head]."""
    out = get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    q = get_act_patch_attn_head_q_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    k = _pad_heads(get_act_patch_attn_head_k_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs), q)
    v = _pad_heads(get_act_patch_attn_head_v_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs), q)
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric, **kwargs)
    return torch.stack([out, q, k, v, einops.rearrange(pattern, "layer head pos -> layer pos head")])


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs) -> Float[Tensor, "patch_type layer pos"]:
    """TL's: resid_pre, attn_out and mlp_out by position, stacked [3, layer, pos]."""
    return torch.stack([
        get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric, **kwargs),
        get_act_patch_attn_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
        get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, metric, **kwargs),
    ])
