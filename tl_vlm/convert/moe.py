"""Mixture-of-experts MLPs of HF decoders (Qwen3-MoE layout: a ``gate`` router and stacked ``experts`` tensors)."""

from __future__ import annotations

from tl_vlm.components import param_layout as layout
from tl_vlm.components.moe import MoEConfig
from tl_vlm.convert.rules import Rule


def qwen_moe_config(tc) -> MoEConfig:
    """Which blocks are sparse, as HF's ``Qwen3VLMoeTextDecoderLayer`` decides: not in ``mlp_only_layers`` and
    every ``decoder_sparse_step``-th block."""
    sparse = tuple(
        i for i in range(tc.num_hidden_layers)
        if i not in tc.mlp_only_layers and tc.num_experts > 0 and (i + 1) % tc.decoder_sparse_step == 0
    )
    return MoEConfig(tc.num_experts, tc.num_experts_per_tok, tc.moe_intermediate_size, sparse)


def qwen_moe_rules(hf: str, cfg: MoEConfig) -> list[Rule]:
    """Router and experts of the sparse blocks of the HF decoder under ``hf``; each expert's TL weights are views of
    HF's stacked ``gate_up_proj [expert, 2 * d_expert, d_model]`` and ``down_proj [expert, d_model, d_expert]``."""
    layer, mlp = rf"{hf}\.layers\.(\d+)\.mlp", r"blocks.\1.mlp"
    experts = range(cfg.n_experts)
    half = cfg.d_expert
    return [
        Rule(rf"{layer}\.gate\.weight", f"{mlp}.W_router", layout.transposed),
        Rule(rf"{layer}\.experts\.gate_up_proj",
             tuple(f"{mlp}.experts.{e}.{w}" for e in experts for w in ("W_gate", "W_in")),
             lambda t: tuple(part[e].T for e in experts for part in (t[:, :half], t[:, half:]))),
        Rule(rf"{layer}\.experts\.down_proj", tuple(f"{mlp}.experts.{e}.W_out" for e in experts),
             lambda t: tuple(t[e].T for e in experts)),
    ]
