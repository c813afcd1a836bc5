"""Language models: HF text config -> TowerConfig, and HF keys -> TL names, per kind.

Llama-style decoders (Llama / Vicuna, Mistral, Qwen2), OPT and T5. ``text_lm_config`` picks the builder
from the config's ``model_type``; a family passes the prefix under which its checkpoint stores the LM.
"""

from __future__ import annotations

from tl_vlm.components import param_layout as layout
from tl_vlm.config import T5Config, TowerConfig
from tl_vlm.convert.rules import Rule, attention_rules, mlp_rules, norm_rules

# Which projections carry biases, per Llama-style model type: (attention biases, mlp bias).
_DECODER_BIASES = {
    "llama": lambda c: (("q", "k", "v", "o") if c.attention_bias else (), bool(getattr(c, "mlp_bias", False))),
    "mistral": lambda c: ((), False),
    "qwen2": lambda c: (("q", "k", "v"), False),
    "qwen3": lambda c: (("q", "k", "v", "o") if c.attention_bias else (), False),
}
_QK_NORM = ("qwen3",)


def text_lm_config(tc, name: str) -> TowerConfig:
    """Any supported language model's TowerConfig, by ``tc.model_type``."""
    if tc.model_type == "opt":
        return opt_lm_config(tc, name)
    if tc.model_type == "t5":
        return t5_lm_config(tc, name)
    return decoder_lm_config(tc, name)


def supported_language_models() -> list[str]:
    return sorted([*_DECODER_BIASES, "opt", "t5"])


def attention_biases(cfg: TowerConfig) -> tuple[str, ...]:
    return (("q", "k", "v") if cfg.attn_bias else ()) + (("o",) if cfg.attn_out_bias else ())


def decoder_lm_config(
    tc, name: str, attn_biases: tuple[str, ...] | None = None, head_dim: int | None = None, tie: bool | None = None,
    qk_norm: bool | None = None,
) -> TowerConfig:
    """HF Llama-style decoder config -> TowerConfig. Families whose text config has its own model type
    (Qwen-VL's) pass the biases, head size, tying and QK-norm HF actually uses."""
    if attn_biases is None and tc.model_type not in _DECODER_BIASES:
        raise NotImplementedError(
            f"language model {tc.model_type!r} is not supported yet; supported: {supported_language_models()}"
        )
    if getattr(tc, "use_sliding_window", False):
        raise NotImplementedError("Qwen2 per-layer sliding-window attention is not supported yet")
    attn_bias, mlp_bias = (attn_biases, False) if attn_biases is not None else _DECODER_BIASES[tc.model_type](tc)
    if "q" in attn_bias and not {"k", "v"} <= set(attn_bias):
        raise NotImplementedError(f"attention biases on {attn_bias} only (q, k and v go together here)")
    head_dim = head_dim or getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return TowerConfig(
        n_layers=tc.num_hidden_layers,
        d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads,
        d_head=head_dim,
        n_key_value_heads=tc.num_key_value_heads,
        d_mlp=tc.intermediate_size,
        act_fn=tc.hidden_act,
        normalization_type="RMS",
        eps=tc.rms_norm_eps,
        d_vocab=tc.vocab_size,
        n_ctx=tc.max_position_embeddings,
        gated_mlp=True,
        attn_bias="q" in attn_bias,
        attn_out_bias="o" in attn_bias,
        mlp_bias=mlp_bias,
        sliding_window=getattr(tc, "sliding_window", None) if tc.model_type == "mistral" else None,
        final_rms=True,
        original_architecture=tc.model_type,
        model_name=name,
        tie_word_embeddings=bool(tc.tie_word_embeddings) if tie is None else tie,
        use_qk_norm=tc.model_type in _QK_NORM if qk_norm is None else qk_norm,
        hf_config=tc,
    )


def decoder_lm_rules(hf: str, cfg: TowerConfig) -> list[Rule]:
    """HF Llama-style decoder (``LlamaModel`` / ``MistralModel`` / ``Qwen2Model`` under ``hf``) -> top-level TL names."""
    layer, block = rf"{hf}\.layers\.(\d+)", r"blocks.\1"
    return [
        Rule(rf"{hf}\.embed_tokens\.weight", "embed.W_E"),
        *attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head, biases=attention_biases(cfg)),
        *norm_rules(rf"{layer}\.self_attn\.q_norm", rf"{block}.attn.q_norm"),
        *norm_rules(rf"{layer}\.self_attn\.k_norm", rf"{block}.attn.k_norm"),
        *norm_rules(rf"{layer}\.input_layernorm", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.post_attention_layernorm", rf"{block}.ln2"),
        *mlp_rules(rf"{layer}\.mlp", rf"{block}.mlp", "up_proj", "down_proj", "gate_proj", bias=cfg.mlp_bias),
        *norm_rules(rf"{hf}\.norm", "ln_final"),
        Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed),
        Rule(rf"{hf}\.rotary_emb\.inv_freq", "rotary.inv_freq"),  # only an in-memory HF model has it
    ]


def opt_lm_config(tc, name: str) -> TowerConfig:
    if not tc.do_layer_norm_before or getattr(tc, "_remove_final_layer_norm", False):
        raise NotImplementedError("post-LN OPT (opt-350m style) is not supported; BLIP-2 uses pre-LN OPT")
    if not tc.layer_norm_elementwise_affine:
        raise NotImplementedError("OPT without LayerNorm weights is not supported")
    if tc.word_embed_proj_dim != tc.hidden_size:
        # HF's BLIP-2 writes hidden_size-wide query features into the word_embed_proj_dim-wide embeddings,
        # so no BLIP-2 checkpoint can have project_in/out.
        raise NotImplementedError(
            f"OPT with word_embed_proj_dim={tc.word_embed_proj_dim} != hidden_size={tc.hidden_size} "
            "(project_in/out) is not supported"
        )
    bias = tc.enable_bias
    return TowerConfig(
        n_layers=tc.num_hidden_layers,
        d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads,
        d_head=tc.hidden_size // tc.num_attention_heads,
        d_mlp=tc.ffn_dim,
        act_fn=tc.activation_function,
        normalization_type="LN",
        eps=1e-5,  # OPT's nn.LayerNorm default; the config has no eps
        d_vocab=tc.vocab_size,
        n_ctx=tc.max_position_embeddings,
        attn_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        positional_embedding_type="standard",
        scale_queries=True,
        original_architecture="opt",
        model_name=name,
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        hf_config=tc,
    )


def opt_rules(hf: str, cfg: TowerConfig) -> list[Rule]:
    """HF ``OPTDecoder`` (under ``hf``) -> top-level TL names."""
    layer, block = rf"{hf}\.layers\.(\d+)", r"blocks.\1"
    return [
        Rule(rf"{hf}\.embed_tokens\.weight", "embed.W_E"),
        # OPT's table starts with 2 rows no real position reads (its offset); TL's W_pos starts at position 0.
        Rule(rf"{hf}\.embed_positions\.weight", "pos_embed.W_pos", lambda t: t[2:]),
        *attention_rules(rf"{layer}\.self_attn", rf"{block}.attn", cfg.d_head, o="out_proj", biases=attention_biases(cfg)),
        *norm_rules(rf"{layer}\.self_attn_layer_norm", rf"{block}.ln1"),
        *norm_rules(rf"{layer}\.final_layer_norm", rf"{block}.ln2"),
        *mlp_rules(layer, rf"{block}.mlp", "fc1", "fc2", bias=cfg.mlp_bias),
        *norm_rules(rf"{hf}\.final_layer_norm", "ln_final"),
        Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed),
    ]


def t5_lm_config(tc, name: str) -> T5Config:
    return T5Config(
        n_layers=tc.num_layers,
        d_model=tc.d_model,
        n_heads=tc.num_heads,
        d_head=tc.d_kv,
        d_mlp=tc.d_ff,
        act_fn=tc.dense_act_fn,
        normalization_type="RMS",
        eps=tc.layer_norm_epsilon,
        d_vocab=tc.vocab_size,
        gated_mlp=tc.is_gated_act,
        use_attn_scale=False,
        attention_dir="bidirectional",
        positional_embedding_type="relative_positional_bias",
        original_architecture="t5",
        model_name=name,
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        hf_config=tc,
        n_decoder_layers=tc.num_decoder_layers,
        relative_attention_num_buckets=tc.relative_attention_num_buckets,
        relative_attention_max_distance=tc.relative_attention_max_distance,
        scale_decoder_outputs=bool(tc.scale_decoder_outputs),
        decoder_start_token_id=tc.decoder_start_token_id,
    )


def t5_rules(hf: str, cfg: T5Config) -> list[Rule]:
    """HF ``T5ForConditionalGeneration`` (under ``hf``) -> ``encoder.*`` / ``decoder.*`` TL names."""
    gated = cfg.gated_mlp
    rules = [Rule(rf"{hf}\.shared\.weight", "embed.W_E"), Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed)]
    for stack in ("encoder", "decoder"):
        layer, block = rf"{hf}\.{stack}\.block\.(\d+)\.layer", rf"{stack}.blocks.\1"
        ff_index = 2 if stack == "decoder" else 1
        rules += [
            Rule(rf"{hf}\.{stack}\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", f"{stack}.rel_pos.W_rel"),
            *attention_rules(rf"{layer}\.0\.SelfAttention", rf"{block}.attn", cfg.d_head, "q", "k", "v", "o"),
            *norm_rules(rf"{layer}\.0\.layer_norm", rf"{block}.ln1"),
            *mlp_rules(
                rf"{layer}\.{ff_index}\.DenseReluDense", rf"{block}.mlp", "wi_1" if gated else "wi", "wo",
                "wi_0" if gated else None, bias=False,
            ),
            *norm_rules(rf"{layer}\.{ff_index}\.layer_norm", rf"{block}.{'ln3' if stack == 'decoder' else 'ln2'}"),
            *norm_rules(rf"{hf}\.{stack}\.final_layer_norm", f"{stack}.ln_final"),
        ]
    cross = rf"{hf}\.decoder\.block\.(\d+)\.layer\.1"
    return rules + [
        *attention_rules(rf"{cross}\.EncDecAttention", r"decoder.blocks.\1.cross_attn", cfg.d_head, "q", "k", "v", "o"),
        *norm_rules(rf"{cross}\.layer_norm", r"decoder.blocks.\1.ln2"),
    ]


def t5_ignored(hf: str) -> list[str]:
    """Keys of a T5 checkpoint with no place of their own: tied copies and the unused cross-attention bias."""
    return [
        rf"{hf}\.(encoder|decoder)\.embed_tokens\.weight",
        rf"{hf}\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
    ]
