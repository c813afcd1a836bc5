"""BLIP-2 / InstructBLIP Q-Former: HF config -> QFormerConfig, HF keys -> ``qformer.*`` TL names."""

from __future__ import annotations

from tl_vlm.config import QFormerConfig
from tl_vlm.convert.rules import Rule, attention_rules, mlp_rules, norm_rules


def qformer_config(qc, num_query_tokens: int, d_vision: int) -> QFormerConfig:
    return QFormerConfig(
        n_layers=qc.num_hidden_layers,
        d_model=qc.hidden_size,
        n_heads=qc.num_attention_heads,
        d_head=qc.hidden_size // qc.num_attention_heads,
        d_mlp=qc.intermediate_size,
        act_fn=qc.hidden_act,
        normalization_type="LN",
        eps=qc.layer_norm_eps,
        d_vocab=qc.vocab_size,
        n_ctx=qc.max_position_embeddings,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        original_architecture=type(qc).__name__.removesuffix("Config") + "Model",
        hf_config=qc,
        num_query_tokens=num_query_tokens,
        cross_attention_frequency=qc.cross_attention_frequency,
        d_vision=d_vision,
    )


def qformer_rules(cfg: QFormerConfig) -> list[Rule]:
    layer, block = r"qformer\.encoder\.layer\.(\d+)", r"qformer.blocks.\1"
    bert = dict(q="attention.query", k="attention.key", v="attention.value", o="output.dense", biases="qkvo")
    return [
        Rule(r"query_tokens", "qformer.query_tokens", lambda t: t[0]),
        *norm_rules(r"qformer\.(?:embeddings\.)?layernorm", "qformer.ln_embed"),  # BLIP-2 | InstructBLIP
        Rule(r"qformer\.embeddings\.word_embeddings\.weight", "qformer.embed.W_E"),
        Rule(r"qformer\.embeddings\.position_embeddings\.weight", "qformer.pos_embed.W_pos"),
        *attention_rules(rf"{layer}\.attention", rf"{block}.attn", cfg.d_head, **bert),
        *norm_rules(rf"{layer}\.attention\.output\.LayerNorm", rf"{block}.ln1"),
        *attention_rules(rf"{layer}\.crossattention", rf"{block}.cross_attn", cfg.d_head, **bert),
        *norm_rules(rf"{layer}\.crossattention\.output\.LayerNorm", rf"{block}.ln_cross"),
        *mlp_rules(layer, rf"{block}.mlp", r"intermediate_query\.dense", r"output_query\.dense"),
        *norm_rules(rf"{layer}\.output_query\.LayerNorm", rf"{block}.ln2"),
        *mlp_rules(layer, rf"{block}.mlp_text", r"intermediate\.dense", r"output\.dense"),
        *norm_rules(rf"{layer}\.output\.LayerNorm", rf"{block}.ln2_text"),
    ]
