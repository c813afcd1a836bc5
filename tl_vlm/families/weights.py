"""HF state-dict keys -> TL parameter names, one tensor at a time (no second copy of the model).

Each family lists rules (regex over the HF key, TL name template, layout transform). Converted
tensors are views of the source tensors, so a checkpoint streams into the model tensor by tensor,
and an in-memory HF model shares its storage with the converted one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from tl_vlm.components import layout

Transform = Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Rule:
    """``target`` may be a tuple for a fused HF tensor (e.g. qkv); ``transform`` then returns one view per target."""

    pattern: str
    target: str | tuple[str, ...]
    transform: Transform = identity


class WeightMap:
    def __init__(self, rules: Iterable[Rule], ignore: Iterable[str] = ()):
        self.rules = [(re.compile(r.pattern), r.target, r.transform) for r in rules]
        self.ignore = [re.compile(p) for p in ignore]

    def match(self, key: str) -> tuple[str | tuple[str, ...], Transform] | None:
        """TL name(s) and layout transform for an HF key; None for keys the model does not use."""
        for pattern, target, transform in self.rules:
            match = pattern.fullmatch(key)
            if match:
                if isinstance(target, tuple):
                    return tuple(match.expand(t) for t in target), transform
                return match.expand(target), transform
        if any(p.fullmatch(key) for p in self.ignore):
            return None
        raise KeyError(
            f"checkpoint weight {key!r} has no place in the converted model; the checkpoint does not match "
            "the architecture its config names (a wrong or modified checkpoint?)"
        )


def attention_rules(hf: str, tl: str, d_head: int, names: dict[str, str], bias: tuple[str, ...]) -> list[Rule]:
    """Q/K/V/O projections of one attention layout. ``names`` maps q/k/v/o to HF module names."""
    rules = [
        Rule(rf"{hf}\.{names['q']}\.weight", rf"{tl}.attn.W_Q", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.{names['k']}\.weight", rf"{tl}.attn._W_K", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.{names['v']}\.weight", rf"{tl}.attn._W_V", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.{names['o']}\.weight", rf"{tl}.attn.W_O", lambda t: layout.heads_out(t, d_head)),
    ]
    tl_bias = {"q": "b_Q", "k": "_b_K", "v": "_b_V"}
    for proj in bias:
        if proj == "o":
            rules.append(Rule(rf"{hf}\.{names['o']}\.bias", rf"{tl}.attn.b_O"))
        else:
            rules.append(
                Rule(rf"{hf}\.{names[proj]}\.bias", rf"{tl}.attn.{tl_bias[proj]}", lambda t: layout.bias_heads(t, d_head))
            )
    return rules


def linear_rules(hf: str, tl_weight: str, tl_bias: str | None) -> list[Rule]:
    rules = [Rule(rf"{hf}\.weight", tl_weight, layout.transposed)]
    if tl_bias is not None:
        rules.append(Rule(rf"{hf}\.bias", tl_bias))
    return rules


def clip_vision_rules(hf: str, tl: str, d_head: int) -> list[Rule]:
    """HF ``CLIPVisionModel`` / ``SiglipVisionModel`` (under prefix ``hf``) -> ``CLIPVisionTower`` (under ``tl``);
    rules for parts one of them lacks (class token, ``pre_layrnorm``, patch bias) simply match nothing."""
    layer, block = rf"{hf}\.encoder\.layers\.(\d+)", rf"{tl}.blocks.\1"
    return [
        Rule(rf"{hf}\.embeddings\.patch_embedding\.weight", f"{tl}.embed.W_patch"),
        Rule(rf"{hf}\.embeddings\.patch_embedding\.bias", f"{tl}.embed.b_patch"),
        Rule(rf"{hf}\.embeddings\.class_embedding", f"{tl}.embed.class_embedding"),
        Rule(rf"{hf}\.embeddings\.position_embedding\.weight", f"{tl}.embed.W_pos"),
        Rule(rf"{hf}\.pre_layrnorm\.weight", f"{tl}.ln_pre.w"),
        Rule(rf"{hf}\.pre_layrnorm\.bias", f"{tl}.ln_pre.b"),
        *attention_rules(
            rf"{layer}\.self_attn", block, d_head, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}, ("q", "k", "v", "o")
        ),
        Rule(rf"{layer}\.layer_norm1\.weight", rf"{block}.ln1.w"),
        Rule(rf"{layer}\.layer_norm1\.bias", rf"{block}.ln1.b"),
        Rule(rf"{layer}\.layer_norm2\.weight", rf"{block}.ln2.w"),
        Rule(rf"{layer}\.layer_norm2\.bias", rf"{block}.ln2.b"),
        *linear_rules(rf"{layer}\.mlp\.fc1", rf"{block}.mlp.W_in", rf"{block}.mlp.b_in"),
        *linear_rules(rf"{layer}\.mlp\.fc2", rf"{block}.mlp.W_out", rf"{block}.mlp.b_out"),
    ]


def decoder_lm_rules(hf: str, d_head: int, bias: tuple[str, ...], mlp_bias: bool) -> list[Rule]:
    """HF Llama-style decoder (``LlamaModel`` / ``MistralModel`` / ``Qwen2Model``) -> top-level TL names."""
    layer, block = rf"{hf}\.layers\.(\d+)", r"blocks.\1"
    mlp = [
        *linear_rules(rf"{layer}\.mlp\.gate_proj", rf"{block}.mlp.W_gate", rf"{block}.mlp.b_gate" if mlp_bias else None),
        *linear_rules(rf"{layer}\.mlp\.up_proj", rf"{block}.mlp.W_in", rf"{block}.mlp.b_in" if mlp_bias else None),
        *linear_rules(rf"{layer}\.mlp\.down_proj", rf"{block}.mlp.W_out", rf"{block}.mlp.b_out" if mlp_bias else None),
    ]
    return [
        Rule(rf"{hf}\.embed_tokens\.weight", "embed.W_E"),
        *attention_rules(
            rf"{layer}\.self_attn", block, d_head, {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}, bias
        ),
        Rule(rf"{layer}\.input_layernorm\.weight", rf"{block}.ln1.w"),
        Rule(rf"{layer}\.post_attention_layernorm\.weight", rf"{block}.ln2.w"),
        *mlp,
        Rule(rf"{hf}\.norm\.weight", "ln_final.w"),
        Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed),
    ]


def set_parameter(root: nn.Module, name: str, value: Tensor) -> None:
    """Replace a parameter by ``value`` (a view of the source), checking the shape it must have."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    old = module._parameters.get(leaf)
    if old is None:
        raise KeyError(f"converted model has no parameter {name!r}")
    if old.shape != value.shape:
        raise ValueError(f"weight {name!r}: checkpoint gives shape {tuple(value.shape)}, config implies {tuple(old.shape)}")
    module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def load_weights(
    root: nn.Module,
    weight_map: WeightMap,
    tensors: Iterator[tuple[str, Tensor]],
    normalize_key: Callable[[str], str],
    device: torch.device | str | None,
    dtype: torch.dtype,
    fp32: str | None = None,
) -> set[str]:
    """Stream ``tensors`` into ``root``; returns the TL names that were set. Names the regular expression
    ``fp32`` matches (from the start) are kept in float32."""
    loaded = set()
    for key, tensor in tensors:
        matched = weight_map.match(normalize_key(key))
        if matched is None:
            continue
        name, transform = matched
        first = name[0] if isinstance(name, tuple) else name
        target = torch.float32 if fp32 and re.match(fp32, first) else dtype
        source = tensor.to(device=device, dtype=target) if tensor.is_floating_point() else tensor.to(device)
        names, values = (name, transform(source)) if isinstance(name, tuple) else ((name,), (transform(source),))
        for one, value in zip(names, values, strict=True):
            set_parameter(root, one, value)
            loaded.add(one)
    return loaded
