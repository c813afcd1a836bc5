"""HF state-dict keys -> TL parameter names, one tensor at a time (no second copy of the model).

Each family lists rules (regex over the HF key, TL name template, layout transform), built with the
builders below and those of ``text_lms`` / ``vits`` / ``qformer``. Converted
tensors are views of the source tensors, so a checkpoint streams into the model tensor by tensor,
and an in-memory HF model shares its storage with the converted one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from tl_vlm.components import param_layout as layout

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
        raise ValueError(
            f"checkpoint weight {key!r} has no place in the converted model; the checkpoint does not match "
            "the architecture its config names (a wrong or modified checkpoint?)"
        )


def _heads_in(d_head: int) -> Transform:
    return functools.partial(layout.heads_in, d_head=d_head)


def _bias_heads(d_head: int) -> Transform:
    return functools.partial(layout.bias_heads, d_head=d_head)


def _thirds(transform: Transform) -> Callable[[Tensor], tuple[Tensor, ...]]:
    return lambda t: tuple(transform(part) for part in t.chunk(3))


def attention_rules(
    hf: str,
    tl: str,
    d_head: int,
    q: str = "q_proj",
    k: str = "k_proj",
    v: str = "v_proj",
    o: str = "o_proj",
    biases: Iterable[str] = (),
    qkv: str | None = None,
) -> list[Rule]:
    """Q/K/V/O projections of the HF attention module ``hf`` -> the TL attention module ``tl`` (e.g.
    ``blocks.\\1.attn``). ``biases`` names the projections with a bias (q, k, v, o); ``qkv`` names a fused
    ``[q; k; v]`` projection that replaces q, k and v (each TL matrix becomes a view of its third)."""
    biases = set(biases)
    heads_in, bias_heads = _heads_in(d_head), _bias_heads(d_head)
    if qkv is not None:
        rules = [Rule(rf"{hf}\.{qkv}\.weight", (f"{tl}.W_Q", f"{tl}._W_K", f"{tl}._W_V"), _thirds(heads_in))]
        if biases & {"q", "k", "v"}:
            rules.append(Rule(rf"{hf}\.{qkv}\.bias", (f"{tl}.b_Q", f"{tl}._b_K", f"{tl}._b_V"), _thirds(bias_heads)))
    else:
        rules = []
        for proj, name, weight, bias in (("q", q, "W_Q", "b_Q"), ("k", k, "_W_K", "_b_K"), ("v", v, "_W_V", "_b_V")):
            rules.append(Rule(rf"{hf}\.{name}\.weight", f"{tl}.{weight}", heads_in))
            if proj in biases:
                rules.append(Rule(rf"{hf}\.{name}\.bias", f"{tl}.{bias}", bias_heads))
    rules.append(Rule(rf"{hf}\.{o}\.weight", f"{tl}.W_O", functools.partial(layout.heads_out, d_head=d_head)))
    if "o" in biases:
        rules.append(Rule(rf"{hf}\.{o}\.bias", f"{tl}.b_O"))
    return rules


def linear_rules(hf: str, tl_weight: str, tl_bias: str | None) -> list[Rule]:
    rules = [Rule(rf"{hf}\.weight", tl_weight, layout.transposed)]
    if tl_bias is not None:
        rules.append(Rule(rf"{hf}\.bias", tl_bias))
    return rules


def norm_rules(hf: str, tl: str) -> list[Rule]:
    """LayerNorm or RMSNorm: the bias rule matches nothing for a norm without one."""
    return [Rule(rf"{hf}\.weight", f"{tl}.w"), Rule(rf"{hf}\.bias", f"{tl}.b")]


def mlp_rules(hf: str, tl: str, w_in: str, w_out: str, w_gate: str | None = None, bias: bool = True) -> list[Rule]:
    """An MLP (``tl``: the TL MLP module); ``w_gate`` names the gate projection of a gated MLP."""
    b = (lambda name: f"{tl}.{name}") if bias else (lambda name: None)
    gate = linear_rules(rf"{hf}\.{w_gate}", f"{tl}.W_gate", b("b_gate")) if w_gate is not None else []
    return [
        *gate,
        *linear_rules(rf"{hf}\.{w_in}", f"{tl}.W_in", b("b_in")),
        *linear_rules(rf"{hf}\.{w_out}", f"{tl}.W_out", b("b_out")),
    ]


def set_parameter(root: nn.Module, name: str, value: Tensor) -> None:
    """Replace a parameter (or a buffer: rotary frequencies) by ``value`` (a view of the source), checking the
    shape it must have."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        module = None
    old = module._parameters.get(leaf, module._buffers.get(leaf)) if module is not None else None
    if old is None:
        raise ValueError(
            f"the model built from the config has no parameter {name!r} (more layers or parts in the checkpoint than "
            "in its config?)"
        )
    if old.shape != value.shape:
        raise ValueError(f"weight {name!r}: checkpoint gives shape {tuple(value.shape)}, config implies {tuple(old.shape)}")
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def _is_buffer(root: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    try:
        return leaf in (root.get_submodule(module_name) if module_name else root)._buffers
    except AttributeError:  # no such module (a checkpoint with more layers): set_parameter names it
        return False


def load_weights(
    root: nn.Module,
    weight_map: WeightMap,
    tensors: Iterator[tuple[str, Tensor]],
    normalize_key: Callable[[str], str],
    device: torch.device | str | Callable[[str], torch.device] | None,
    dtype: torch.dtype,
    fp32: str | None = None,
    keep_float32: bool = False,
) -> set[str]:
    """Stream ``tensors`` into ``root``; returns the TL names that were set. Names the regular expression
    ``fp32`` matches (from the start) are kept in float32, so are float32 tensors with ``keep_float32``, and so are
    buffers (rotary frequencies: float32 in HF too, though a HF model cast with ``.to(dtype)`` holds them rounded,
    and those are the values it uses)."""
    loaded = set()
    for key, tensor in tensors:
        matched = weight_map.match(normalize_key(key))
        if matched is None:
            continue
        name, transform = matched
        if not tensor.is_floating_point():  # e.g. a quantised checkpoint's packed integers
            raise ValueError(
                f"checkpoint weight {key!r} is {tensor.dtype}; tl_vlm converts floating-point weights only (quantised "
                "checkpoints are not supported: load the float16 / bfloat16 / float32 release)"
            )
        first = name[0] if isinstance(name, tuple) else name
        float32 = (fp32 and re.match(fp32, first)) or (keep_float32 and tensor.dtype == torch.float32)
        target = torch.float32 if float32 or _is_buffer(root, first) else dtype
        source = tensor.to(device=device(first) if callable(device) else device, dtype=target)
        try:
            converted = transform(source)
        except RuntimeError as err:  # a layout reshape that the checkpoint's shape cannot fill
            raise ValueError(
                f"checkpoint weight {key!r} has shape {tuple(tensor.shape)}, which does not fit {first!r} as the "
                f"config describes it ({err})"
            ) from None
        names, values = (name, converted) if isinstance(name, tuple) else ((name,), (converted,))
        for one, value in zip(names, values, strict=True):
            try:
                set_parameter(root, one, value)
            except ValueError as err:
                raise ValueError(f"checkpoint weight {key!r}: {err}") from None
            loaded.add(one)
    return loaded
