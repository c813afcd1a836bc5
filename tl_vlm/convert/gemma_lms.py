"""Gemma language models (Gemma, Gemma 2, Gemma 3 text): HF text config -> TowerConfig, HF keys -> TL names.

Gemma's RMSNorm scales by ``1 + w``; TL's convention (``w`` is the scale) is kept by adding 1 at conversion, in
float32: HF computes ``1.0 + w.float()`` and multiplies before rounding, so the norm weights stay float32 in a
half-precision model (``RMSNorm`` then multiplies in float32, as HF) and half precision is HF's bit for bit.
"""

from __future__ import annotations

from torch import Tensor
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

from tl_vlm.components import Rotary
from tl_vlm.components import param_layout as layout
from tl_vlm.config import TowerConfig
from tl_vlm.convert.hf_modules import ModuleRule
from tl_vlm.convert.rules import Rule, attention_rules, mlp_rules

GEMMA_KINDS = ("gemma", "gemma2", "gemma3_text")
_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}
# The TL names of Gemma norm scales (1 + w, computed at conversion); Gemma 3's projector norm too.
GEMMA_NORMS = r"(blocks\.\d+\.(ln[12](_post)?|attn\.[qk]_norm)|ln_final|projector\.ln)\.w"


def gemma_lm_config(tc, name: str, prefix_lm: bool = False) -> TowerConfig:
    """Gemma / Gemma 2 / Gemma 3 text config -> TowerConfig (TL's Gemma fields: attn_scale, soft caps, norms
    before and after, attn_types). ``prefix_lm``: PaliGemma, whose config sets ``use_bidirectional_attention`` and
    whose forward builds every mask (prefix bidirectional, suffix causal)."""
    kind = tc.model_type
    if kind not in GEMMA_KINDS:
        raise NotImplementedError(f"language model {kind!r} is not a Gemma; expected one of {GEMMA_KINDS}")
    if getattr(tc, "use_bidirectional_attention", False) and not prefix_lm:
        raise NotImplementedError("Gemma with use_bidirectional_attention (an embedding model) is not supported")
    if getattr(tc, "attention_bias", False):
        raise NotImplementedError("Gemma with attention biases is not supported (no Gemma checkpoint has them)")
    gemma1 = kind == "gemma"
    layer_types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    unknown = set(layer_types) - set(_ATTN_TYPES)
    if unknown:
        raise NotImplementedError(f"Gemma layer types {sorted(unknown)} are not supported; expected {sorted(_ATTN_TYPES)}")
    # Gemma 3's attention ignores attn_logit_softcapping (HF passes no softcap there); Gemma 2 caps.
    attn_cap = tc.attn_logit_softcapping if kind == "gemma2" else None
    final_cap = None if gemma1 else tc.final_logit_softcapping
    return TowerConfig(
        n_layers=tc.num_hidden_layers,
        d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads,
        d_head=tc.head_dim,
        n_key_value_heads=tc.num_key_value_heads,
        d_mlp=tc.intermediate_size,
        act_fn=tc.hidden_act if gemma1 else tc.hidden_activation,
        normalization_type="RMS",
        eps=tc.rms_norm_eps,
        d_vocab=tc.vocab_size,
        n_ctx=tc.max_position_embeddings,
        gated_mlp=True,
        sliding_window=None if gemma1 else tc.sliding_window,
        use_qk_norm=kind == "gemma3_text",
        attn_scale=-1.0 if gemma1 else float(tc.query_pre_attn_scalar) ** 0.5,
        attn_scores_soft_cap=-1.0 if attn_cap is None else float(attn_cap),
        output_logits_soft_cap=-1.0 if final_cap is None else float(final_cap),
        use_normalization_before_and_after=not gemma1,
        attn_types=[_ATTN_TYPES[t] for t in layer_types],
        final_rms=True,
        original_architecture=kind,
        model_name=name,
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        hf_config=tc,
    )


def gemma_rotaries(tc) -> tuple[Rotary, Rotary | None]:
    """(global, local) rotary tables: Gemma 3 gives each layer type its own RoPE parameters (base, scaling)."""
    if tc.model_type != "gemma3_text":
        return Rotary.from_hf_config(tc), None
    hf = Gemma3RotaryEmbedding(tc)
    rotaries = {}
    for layer_type in ("full_attention", "sliding_attention"):
        if layer_type in hf.rope_type and hf.rope_type[layer_type] in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope_type {hf.rope_type[layer_type]!r} changes with sequence length; not supported")
        rotaries[layer_type] = Rotary(getattr(hf, f"{layer_type}_inv_freq"), getattr(hf, f"{layer_type}_attention_scaling"))
    return rotaries["full_attention"], rotaries["sliding_attention"]


def one_plus(t: Tensor) -> Tensor:
    """Gemma's norm weight as TL's scale, in float32 (HF's ``1.0 + w.float()``)."""
    return t.float() + 1.0


def gemma_norm_rules(hf: str, tl: str) -> list[Rule]:
    return [Rule(rf"{hf}\.weight", f"{tl}.w", one_plus)]


def gemma_lm_rules(hf: str, cfg: TowerConfig) -> list[Rule]:
    """HF ``GemmaModel`` / ``Gemma2Model`` / ``Gemma3TextModel`` (under ``hf``) -> top-level TL names."""
    layer, block = rf"{hf}\.layers\.(\d+)", r"blocks.\1"
    if cfg.use_normalization_before_and_after:  # Gemma 2 / 3: post_attention_layernorm is the attention's post-norm
        norms = [
            *gemma_norm_rules(rf"{layer}\.input_layernorm", rf"{block}.ln1"),
            *gemma_norm_rules(rf"{layer}\.post_attention_layernorm", rf"{block}.ln1_post"),
            *gemma_norm_rules(rf"{layer}\.pre_feedforward_layernorm", rf"{block}.ln2"),
            *gemma_norm_rules(rf"{layer}\.post_feedforward_layernorm", rf"{block}.ln2_post"),
        ]
    else:
        norms = [
            *gemma_norm_rules(rf"{layer}\.input_layernorm", rf"{block}.ln1"),
            *gemma_norm_rules(rf"{layer}\.post_attention_layernorm", rf"{block}.ln2"),
        ]
    return [
        Rule(rf"{hf}\.embed_tokens\.weight", "embed.W_E"),
        *attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head),
        *gemma_norm_rules(rf"{layer}\.self_attn\.q_norm", rf"{block}.attn.q_norm"),
        *gemma_norm_rules(rf"{layer}\.self_attn\.k_norm", rf"{block}.attn.k_norm"),
        *norms,
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", "up_proj", "down_proj", "gate_proj", bias=False),
        *gemma_norm_rules(rf"{hf}\.norm", "ln_final"),
        Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed),
        # Only an in-memory HF model has the frequencies (a HF model cast with .to(dtype) holds them rounded).
        Rule(rf"{hf}\.rotary_emb\.(inv_freq|full_attention_inv_freq)", "rotary.inv_freq"),
        Rule(rf"{hf}\.rotary_emb\.sliding_attention_inv_freq", "rotary_local.inv_freq"),
    ]


def gemma_lm_modules(hf: str, cfg: TowerConfig) -> list[ModuleRule]:
    """HF module names of a Gemma decoder (``gemma_lm_rules``' layout) -> what holds the same output here. In Gemma 2 /
    3 HF's ``self_attn`` / ``mlp`` outputs precede the post-norms, so they are our ``attn`` / ``mlp`` modules'
    outputs, and ``post_attention_layernorm`` is ``ln1_post``; in Gemma 1 it is the MLP's pre-norm, ``ln2``."""
    layer = f"{hf}.layers.{{i}}"
    rules = [ModuleRule(layer, "blocks.{i}.hook_resid_post", "language"),
             ModuleRule(f"{layer}.input_layernorm", "blocks.{i}.ln1", "language")]
    if cfg.use_normalization_before_and_after:
        rules += [
            ModuleRule(f"{layer}.self_attn", "blocks.{i}.attn", "language"),
            ModuleRule(f"{layer}.post_attention_layernorm", "blocks.{i}.ln1_post", "language"),
            ModuleRule(f"{layer}.pre_feedforward_layernorm", "blocks.{i}.ln2", "language"),
            ModuleRule(f"{layer}.mlp", "blocks.{i}.mlp", "language"),
            ModuleRule(f"{layer}.post_feedforward_layernorm", "blocks.{i}.ln2_post", "language"),
        ]
    else:
        rules += [
            ModuleRule(f"{layer}.self_attn", "blocks.{i}.hook_attn_out", "language"),
            ModuleRule(f"{layer}.post_attention_layernorm", "blocks.{i}.ln2", "language"),
            ModuleRule(f"{layer}.mlp", "blocks.{i}.hook_mlp_out", "language"),
        ]
    # q_norm / k_norm are not listed: HF's run on [batch, head, pos, d_head], ours on [batch, pos, head, d_head].
    # lm_head is before Gemma 2's logit cap, as unembed's output is.
    return rules + [ModuleRule(f"{hf}.norm", "ln_final"), ModuleRule("lm_head", "unembed")]
