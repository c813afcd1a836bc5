"""BLIP-2 and InstructBLIP: EVA ViT -> Q-Former (learned queries cross-attend to the image) -> linear
projection -> OPT / Llama (decoder-only) or Flan-T5 (encoder-decoder) language model.

With Flan-T5 the merged prompt (queries + text) is the encoder's input; the forward pass needs
``decoder_input_ids`` as HF's does, and ``generate`` returns the decoder's tokens (starting with the
decoder start token), as HF's does.

Two prompt forms, as HF has had both:
- image-token form (current checkpoints, config ``image_token_index`` set): the processor puts
  ``num_query_tokens`` image placeholders in ``input_ids`` and the projected query outputs replace them;
- legacy form (older configs without an image token id): the query outputs are prepended to the
  text embeddings (and ones to the attention mask), so logits cover ``num_query_tokens`` extra
  positions first, as HF's pre-4.47 ``Blip2ForConditionalGeneration`` returned them.

The analysis helpers at the bottom say which language positions hold the query outputs and how
much each query reads from each image patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache, layout
from tl_vlm.sampling import logits_processors, next_token
from tl_vlm.config import TowerConfig, VLMConfig
from tl_vlm.families.base import Family
from tl_vlm.families.llava import decoder_lm_config, vit_config
from tl_vlm.families.weights import Rule, WeightMap, decoder_lm_rules, linear_rules
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import CLIPVisionTower, DecoderLM, LinearProjector, QFormer
from tl_vlm.towers.t5 import T5LM


def blip_vision_config(vc) -> TowerConfig:
    return vit_config(vc, attn_bias=vc.qkv_bias, original_architecture=type(vc).__name__.removesuffix("Config") + "Model")


def qformer_config(qc) -> TowerConfig:
    return TowerConfig(
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
        extra={"cross_attention_frequency": qc.cross_attention_frequency},
    )


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
        original_architecture="opt",
        model_name=name,
        extra={"hf_config": tc, "tie_word_embeddings": bool(tc.tie_word_embeddings)},
    )


def _attention_rules(hf: str, tl: str, d_head: int, q: str, k: str, v: str, o: str) -> list[Rule]:
    """q/k/v/o projections with biases, HF modules ``{hf}.{q}`` ..., TL module ``tl`` (``attn``/``cross_attn``)."""
    rules = []
    for name, w, b in ((q, "W_Q", "b_Q"), (k, "_W_K", "_b_K"), (v, "_W_V", "_b_V")):
        rules += [
            Rule(rf"{hf}\.{name}\.weight", f"{tl}.{w}", lambda t: layout.heads_in(t, d_head)),
            Rule(rf"{hf}\.{name}\.bias", f"{tl}.{b}", lambda t: layout.bias_heads(t, d_head)),
        ]
    return rules + [
        Rule(rf"{hf}\.{o}\.weight", f"{tl}.W_O", lambda t: layout.heads_out(t, d_head)),
        Rule(rf"{hf}\.{o}\.bias", f"{tl}.b_O"),
    ]


def _ln_rules(hf: str, tl: str) -> list[Rule]:
    return [Rule(rf"{hf}\.weight", f"{tl}.w"), Rule(rf"{hf}\.bias", f"{tl}.b")]


def blip_vision_rules(d_head: int) -> list[Rule]:
    layer, block = r"vision_model\.encoder\.layers\.(\d+)", r"vision.blocks.\1"

    def split_heads_in(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(layout.heads_in(part, d_head) for part in t.chunk(3, dim=0))

    def split_bias(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(layout.bias_heads(part, d_head) for part in t.chunk(3, dim=0))

    attn = rf"{block}.attn"
    return [
        Rule(r"vision_model\.embeddings\.class_embedding", "vision.embed.class_embedding", lambda t: t.view(-1)),
        Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "vision.embed.W_patch"),
        Rule(r"vision_model\.embeddings\.patch_embedding\.bias", "vision.embed.b_patch"),
        Rule(r"vision_model\.embeddings\.position_embedding", "vision.embed.W_pos", lambda t: t[0]),
        # One fused [q; k; v] matrix; its bias is HF's cat(q_bias, zeros, v_bias), loaded as stored.
        Rule(rf"{layer}\.self_attn\.qkv\.weight", (f"{attn}.W_Q", f"{attn}._W_K", f"{attn}._W_V"), split_heads_in),
        Rule(rf"{layer}\.self_attn\.qkv\.bias", (f"{attn}.b_Q", f"{attn}._b_K", f"{attn}._b_V"), split_bias),
        Rule(rf"{layer}\.self_attn\.projection\.weight", f"{attn}.W_O", lambda t: layout.heads_out(t, d_head)),
        Rule(rf"{layer}\.self_attn\.projection\.bias", f"{attn}.b_O"),
        *_ln_rules(rf"{layer}\.layer_norm1", rf"{block}.ln1"),
        *_ln_rules(rf"{layer}\.layer_norm2", rf"{block}.ln2"),
        *linear_rules(rf"{layer}\.mlp\.fc1", rf"{block}.mlp.W_in", rf"{block}.mlp.b_in"),
        *linear_rules(rf"{layer}\.mlp\.fc2", rf"{block}.mlp.W_out", rf"{block}.mlp.b_out"),
        *_ln_rules(r"vision_model\.post_layernorm", "vision.ln_post"),
    ]


def qformer_rules(d_head: int) -> list[Rule]:
    layer, block = r"qformer\.encoder\.layer\.(\d+)", r"qformer.blocks.\1"
    names = dict(q="attention.query", k="attention.key", v="attention.value", o="output.dense")
    return [
        Rule(r"query_tokens", "qformer.query_tokens", lambda t: t[0]),
        *_ln_rules(r"qformer\.(?:embeddings\.)?layernorm", "qformer.ln_embed"),  # BLIP-2 | InstructBLIP
        Rule(r"qformer\.embeddings\.word_embeddings\.weight", "qformer.embed.W_E"),
        Rule(r"qformer\.embeddings\.position_embeddings\.weight", "qformer.pos_embed.W_pos"),
        *_attention_rules(rf"{layer}\.attention", rf"{block}.attn", d_head, **names),
        *_ln_rules(rf"{layer}\.attention\.output\.LayerNorm", rf"{block}.ln1"),
        *_attention_rules(rf"{layer}\.crossattention", rf"{block}.cross_attn", d_head, **names),
        *_ln_rules(rf"{layer}\.crossattention\.output\.LayerNorm", rf"{block}.ln_cross"),
        *linear_rules(rf"{layer}\.intermediate_query\.dense", rf"{block}.mlp.W_in", rf"{block}.mlp.b_in"),
        *linear_rules(rf"{layer}\.output_query\.dense", rf"{block}.mlp.W_out", rf"{block}.mlp.b_out"),
        *_ln_rules(rf"{layer}\.output_query\.LayerNorm", rf"{block}.ln2"),
        *linear_rules(rf"{layer}\.intermediate\.dense", rf"{block}.mlp_text.W_in", rf"{block}.mlp_text.b_in"),
        *linear_rules(rf"{layer}\.output\.dense", rf"{block}.mlp_text.W_out", rf"{block}.mlp_text.b_out"),
        *_ln_rules(rf"{layer}\.output\.LayerNorm", rf"{block}.ln2_text"),
        *linear_rules(r"language_projection", "projector.W", "projector.b"),
    ]


def opt_rules(d_head: int, bias: bool) -> list[Rule]:
    hf = r"language_model\.model\.decoder"
    layer, block = rf"{hf}\.layers\.(\d+)", r"blocks.\1"
    b = lambda name: name if bias else None  # noqa: E731
    attn = [
        Rule(rf"{layer}\.self_attn\.{proj}_proj\.weight", rf"{block}.attn.{w}", lambda t: layout.heads_in(t, d_head))
        for proj, w in (("q", "W_Q"), ("k", "_W_K"), ("v", "_W_V"))
    ] + [Rule(rf"{layer}\.self_attn\.out_proj\.weight", rf"{block}.attn.W_O", lambda t: layout.heads_out(t, d_head))]
    if bias:
        attn += [
            Rule(rf"{layer}\.self_attn\.{proj}_proj\.bias", rf"{block}.attn.{name}", lambda t: layout.bias_heads(t, d_head))
            for proj, name in (("q", "b_Q"), ("k", "_b_K"), ("v", "_b_V"))
        ] + [Rule(rf"{layer}\.self_attn\.out_proj\.bias", rf"{block}.attn.b_O")]
    return [
        Rule(rf"{hf}\.embed_tokens\.weight", "embed.W_E"),
        # OPT's table starts with 2 rows no real position reads (its offset); TL's W_pos starts at position 0.
        Rule(rf"{hf}\.embed_positions\.weight", "pos_embed.W_pos", lambda t: t[2:]),
        *attn,
        *_ln_rules(rf"{layer}\.self_attn_layer_norm", rf"{block}.ln1"),
        *_ln_rules(rf"{layer}\.final_layer_norm", rf"{block}.ln2"),
        *linear_rules(rf"{layer}\.fc1", rf"{block}.mlp.W_in", b(rf"{block}.mlp.b_in")),
        *linear_rules(rf"{layer}\.fc2", rf"{block}.mlp.W_out", b(rf"{block}.mlp.b_out")),
        *_ln_rules(rf"{hf}\.final_layer_norm", "ln_final"),
        Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed),
    ]


def t5_lm_config(tc, name: str) -> TowerConfig:
    return TowerConfig(
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
        extra={
            "hf_config": tc,
            "tie_word_embeddings": bool(tc.tie_word_embeddings),
            "scale_decoder_outputs": bool(tc.scale_decoder_outputs),
            "relative_attention_num_buckets": tc.relative_attention_num_buckets,
            "relative_attention_max_distance": tc.relative_attention_max_distance,
            "n_decoder_layers": tc.num_decoder_layers,
        },
    )


def t5_rules(cfg: TowerConfig) -> list[Rule]:
    d_head, gated = cfg.d_head, cfg.gated_mlp
    rules = [Rule(r"language_model\.shared\.weight", "embed.W_E"), Rule(r"lm_head\.weight", "unembed.W_U", layout.transposed)]
    for stack in ("encoder", "decoder"):
        hf, layer, block = rf"language_model\.{stack}", rf"language_model\.{stack}\.block\.(\d+)\.layer", rf"{stack}.blocks.\1"
        mlp_index = 2 if stack == "decoder" else 1
        ff = rf"{layer}\.{mlp_index}\.DenseReluDense"
        rules += [
            Rule(rf"{hf}\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", f"{stack}.rel_pos.W_rel"),
            *_attention_rules_nobias(rf"{layer}\.0\.SelfAttention", rf"{block}.attn", d_head),
            Rule(rf"{layer}\.0\.layer_norm\.weight", rf"{block}.ln1.w"),
            *linear_rules(rf"{ff}\.{'wi_0' if gated else 'wi'}", rf"{block}.mlp.{'W_gate' if gated else 'W_in'}", None),
            *(linear_rules(rf"{ff}\.wi_1", rf"{block}.mlp.W_in", None) if gated else []),
            *linear_rules(rf"{ff}\.wo", rf"{block}.mlp.W_out", None),
            Rule(rf"{layer}\.{mlp_index}\.layer_norm\.weight", rf"{block}.{'ln3' if stack == 'decoder' else 'ln2'}.w"),
            Rule(rf"{hf}\.final_layer_norm\.weight", f"{stack}.ln_final.w"),
        ]
    cross = r"language_model\.decoder\.block\.(\d+)\.layer\.1"
    return rules + [
        *_attention_rules_nobias(rf"{cross}\.EncDecAttention", r"decoder.blocks.\1.cross_attn", d_head),
        Rule(rf"{cross}\.layer_norm\.weight", r"decoder.blocks.\1.ln2.w"),
    ]


def _attention_rules_nobias(hf: str, tl: str, d_head: int) -> list[Rule]:
    return [
        Rule(rf"{hf}\.q\.weight", f"{tl}.W_Q", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.k\.weight", f"{tl}._W_K", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.v\.weight", f"{tl}._W_V", lambda t: layout.heads_in(t, d_head)),
        Rule(rf"{hf}\.o\.weight", f"{tl}.W_O", lambda t: layout.heads_out(t, d_head)),
    ]


class Blip2Family(Family):
    name = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)

    # ------------------------------------------------------------------ conversion

    def vlm_config(self, hf_config) -> VLMConfig:
        vc, qc, tc = hf_config.vision_config, hf_config.qformer_config, hf_config.text_config
        name = getattr(hf_config, "_name_or_path", "")
        if tc.model_type == "opt":
            language = opt_lm_config(tc, name)
        elif tc.model_type == "llama":
            language = decoder_lm_config(tc, name)
        elif tc.model_type == "t5":
            language = t5_lm_config(tc, name)
        else:
            raise NotImplementedError(
                f"{type(hf_config).__name__} with a {tc.model_type!r} language model is not supported yet; "
                "supported: opt, llama, t5"
            )
        return VLMConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else self.architectures[0],
            family=self.name,
            language=language,
            vision=blip_vision_config(vc),
            image_token_id=getattr(hf_config, "image_token_index", None),  # None: legacy (prepended) form
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            extra={"hf_config": hf_config, "qformer": qformer_config(qc), "num_query_tokens": hf_config.num_query_tokens},
        )

    def normalize_key(self, key: str) -> str:
        return key.replace("language_model.lm_head.", "lm_head.", 1) if key.startswith("language_model.lm_head.") else key

    def weight_map(self, cfg: VLMConfig) -> WeightMap:
        lm = cfg.language
        if lm.original_architecture == "opt":
            language = opt_rules(lm.d_head, lm.attn_bias)
        elif lm.original_architecture == "t5":
            language = t5_rules(lm)
        else:
            language = decoder_lm_rules(r"language_model\.model", lm.d_head, lm.extra["attn_biases"], lm.mlp_bias)
        return WeightMap(
            [*blip_vision_rules(cfg.vision.d_head), *qformer_rules(cfg.extra["qformer"].d_head), *language],
            ignore=[
                r".*\.position_ids",
                r".*rotary_emb\.inv_freq",
                r"language_model\.(encoder|decoder)\.embed_tokens\.weight",  # T5: tied to shared
                r"language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
            ],
        )

    # ------------------------------------------------------------------ structure

    text_input = False  # InstructBLIP: the instruction enters the Q-Former
    input_fields = Family.input_fields | {"decoder_input_ids", "decoder_attention_mask"}

    def build_language(self, cfg: VLMConfig) -> nn.Module:
        lm = cfg.language
        if _encoder_decoder(cfg):
            return T5LM(lm, lm.replace(n_layers=lm.extra["n_decoder_layers"], attention_dir="causal"))
        if lm.positional_embedding_type == "standard":
            return DecoderLM(lm, None)
        return super().build_language(cfg)

    def fp32_parameters(self, cfg: VLMConfig, dtype: torch.dtype) -> str | None:
        # Loaded in float16 (not bfloat16), HF's BLIP-2 keeps its Q-Former in float32, and Flan-T5 its feed-forward
        # output projections ``wo``. InstructBLIP keeps only its query tokens so and rounds them to float16 on use,
        # which storing them in float16 equals.
        if dtype != torch.float16:
            return None
        kept = [] if self.text_input else [r"qformer\."]
        if _encoder_decoder(cfg):
            kept.append(r"(encoder|decoder)\.blocks\.\d+\.mlp\.W_out$")
            if self.text_input:  # HF matches T5's "wo" inside "word_embeddings" too: the Q-Former's stay float32
                kept.append(r"qformer\.embed\.W_E$")
        return "|".join(kept) or None

    def capabilities(self, cfg: VLMConfig) -> Capabilities:
        return Capabilities(
            image_positions=cfg.image_token_id is not None, spatial_cells=False, patches_per_token=0, queries=True,
            encoder_decoder=_encoder_decoder(cfg),
        )

    def build_towers(self, model) -> None:
        cfg = model.vlm_cfg
        qcfg = cfg.extra["qformer"]
        model.vision = CLIPVisionTower(
            cfg.vision, cfg.image_size, cfg.patch_size, cfg.num_channels, ln_pre=False, ln_post=True, patch_bias=True
        )
        model.qformer = QFormer(
            qcfg, cfg.extra["num_query_tokens"], cfg.vision.d_model, qcfg.extra["cross_attention_frequency"], self.text_input
        )
        model.projector = LinearProjector(qcfg.d_model, cfg.language.d_model)

    def image_token_cells(self, model, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Query outputs are not patches: each placeholder is query ``patch`` of its image, with no pixel box;
        what each query reads from the patches is ``query_patch_attention``."""
        n_query, n_images = model.qformer.n_query, inputs.pixel_values.shape[0]
        return [dict(image=i, tile=i, patch=q, row=-1, col=-1, kind="query") for i in range(n_images) for q in range(n_query)]

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        lm = hf_model.language_model
        layers = {"vision": list(hf_model.vision_model.encoder.layers), "qformer": list(hf_model.qformer.encoder.layer)}
        if hasattr(lm, "encoder"):  # Flan-T5
            return {**layers, "encoder": list(lm.encoder.block), "decoder": list(lm.decoder.block)}
        inner = lm.model
        return {**layers, "language": list(inner.decoder.layers if hasattr(inner, "decoder") else inner.layers)}

    def towers(self, model) -> dict[str, nn.Module]:
        if _encoder_decoder(model.vlm_cfg):
            language = {"encoder": model.encoder, "decoder": model.decoder}
        else:
            language = {"language": model.language}
        return {**language, "vision": model.vision, "qformer": model.qformer}

    # ------------------------------------------------------------------ running

    def query_outputs(self, model, inputs: VLMInputs) -> Float[Tensor, "image query d_qformer"]:
        """The Q-Former's query outputs: what the language model receives (before the projection)."""
        n = model.vision.cfg.n_layers
        image = model.vision.ln_post(model.vision(inputs.pixel_values, keep=[n])[n])
        qformer_dtype = model.qformer.query_tokens.dtype  # float32 in a half-precision BLIP-2, as in HF
        out = model.qformer(image.to(qformer_dtype), inputs.qformer_input_ids, inputs.qformer_attention_mask)
        return out[:, : model.qformer.n_query].to(image.dtype)

    def image_features(self, model, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        return model.projector(self.query_outputs(model, inputs)).flatten(0, 1)

    def image_token_mask(self, model, input_ids: Int[Tensor, "batch pos"]) -> Tensor:
        if model.vlm_cfg.image_token_id is None:  # legacy form: no placeholders in input_ids
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return super().image_token_mask(model, input_ids)

    def _checked_features(self, model, inputs: VLMInputs, image_mask: Tensor) -> Tensor | None:
        n_query = model.qformer.n_query
        counts = image_mask.sum(-1)
        if inputs.pixel_values is not None and bool(image_mask.any()) and bool((counts != n_query).any()):
            raise ValueError(
                f"input_ids rows hold {counts.tolist()} image placeholder tokens; {model.vlm_cfg.architecture} puts "
                f"num_query_tokens={n_query} placeholders per image, one image per prompt (use model.prepare)"
            )
        return super()._checked_features(model, inputs, image_mask)

    def forward(
        self,
        model,
        inputs: VLMInputs,
        position_ids: Tensor | None,
        cache: KVCache | None,
        stop_at_layer: int | None,
        logits_to_keep: int,
        generated_from: int | None,
    ) -> Tensor:
        if _encoder_decoder(model.vlm_cfg):
            if stop_at_layer is not None or cache is not None:
                raise NotImplementedError("stop_at_layer / a KV cache are not supported with an encoder-decoder LM")
            if inputs.decoder_input_ids is None:
                raise ValueError(
                    "Flan-T5 models need decoder_input_ids (as HF's forward does); model.generate starts them itself"
                )
            embeds, mask = self._prompt_embeds(model, inputs)
            encoded = model.language.encode(embeds, mask)
            return model.language.decode(
                inputs.decoder_input_ids, encoded, mask, inputs.decoder_attention_mask, None, logits_to_keep
            )
        if inputs.decoder_input_ids is not None:
            raise ValueError("decoder_input_ids are for encoder-decoder (Flan-T5) models; this LM is decoder-only")
        if model.vlm_cfg.image_token_id is not None:
            return super().forward(model, inputs, position_ids, cache, stop_at_layer, logits_to_keep, generated_from)
        mask = inputs.attention_mask
        n_query = model.qformer.n_query
        if inputs.pixel_values is None:
            # Legacy decode steps: the cache holds the queries, the caller's mask covers only the text.
            if cache is not None and mask is not None and cache.length + inputs.shape[1] == mask.shape[1] + n_query:
                mask = torch.cat([mask.new_ones(mask.shape[0], n_query), mask], dim=1)
            embeds = model.language.embed_inputs(inputs.input_ids)
        else:
            embeds, mask = self._prompt_embeds(model, inputs)
        return model.language(embeds, mask, position_ids, cache, stop_at_layer, logits_to_keep)

    def _prompt_embeds(self, model, inputs: VLMInputs) -> tuple[Tensor, Tensor | None]:
        """The language model's input embeddings and mask, with the projected queries at their positions."""
        ids, mask = inputs.input_ids, inputs.attention_mask
        if model.vlm_cfg.image_token_id is not None:
            image_mask = self.image_token_mask(model, ids)
            features = self._checked_features(model, inputs, image_mask)
            return model.language.embed_inputs(ids, features, image_mask if features is not None else None), mask
        if inputs.pixel_values is None:
            return model.language.embed_inputs(ids), mask
        n_query, batch = model.qformer.n_query, ids.shape[0]
        features = self.image_features(model, inputs)
        if features.shape[0] != batch * n_query:
            raise ValueError(
                f"the images give {features.shape[0] // n_query} query sets for {batch} prompts; the legacy BLIP-2 "
                "form prepends one image's queries to each prompt"
            )
        queries = torch.ones(batch, n_query, dtype=torch.bool, device=ids.device)
        image_mask = torch.cat([queries, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
        embeds = model.language.embed_inputs(torch.cat([ids.new_zeros(batch, n_query), ids], dim=1), features, image_mask)
        return embeds, None if mask is None else torch.cat([queries.to(mask.dtype), mask], dim=1)

    def prefill_positions(self, model, inputs: VLMInputs, mask: Tensor) -> Tensor:
        if model.vlm_cfg.image_token_id is None and inputs.pixel_values is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], model.qformer.n_query), mask], dim=1)
        return super().prefill_positions(model, inputs, mask)


    def generate(self, model, inputs: VLMInputs, settings, use_past_kv_cache: bool, generator) -> Tensor | None:
        """Flan-T5: encode the prompt once, then decode from the decoder start token, as HF's generate."""
        if not _encoder_decoder(model.vlm_cfg):
            return None
        lm = model.language
        embeds, mask = self._prompt_embeds(model, inputs)
        encoded = lm.encode(embeds, mask)
        batch = encoded.shape[0]
        start = settings.decoder_start_token_id
        if start is None:
            start = lm.cfg.extra["hf_config"].decoder_start_token_id
        ids = torch.full((batch, 1), start, dtype=torch.long, device=encoded.device)
        n_new = settings.max_new_tokens if settings.max_new_tokens is not None else max(settings.max_length - 1, 1)
        eos_ids = settings.eos_token_id
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
        pad = settings.pad_token_id if settings.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        processors = logits_processors(settings, torch.ones_like(ids), eos_ids)
        cache = KVCache(lm.decoder.cfg, batch, 1 + n_new, ids.device, encoded.dtype) if use_past_kv_cache else None
        logits = lm.decode(ids, encoded, mask, None, cache, logits_to_keep=1)
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        for _ in range(n_new):
            token = next_token(logits[:, -1].float(), ids, settings, processors, generator).masked_fill(finished, pad)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
            step = token[:, None] if cache is not None else ids
            logits = lm.decode(step, encoded, mask, None, cache, logits_to_keep=1)
        return ids


def _encoder_decoder(cfg: VLMConfig) -> bool:
    return cfg.language.original_architecture == "t5"


class InstructBlipFamily(Blip2Family):
    name = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    input_fields = Blip2Family.input_fields | {"qformer_input_ids", "qformer_attention_mask"}
    text_input = True


# ---------------------------------------------------------------------- analysis helpers


def query_positions(model, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch query"]:
    """Language positions holding the query outputs, in query order (row ``b``, query ``q``).

    Image-token form: the placeholder positions. Legacy form: the first ``num_query_tokens`` positions
    of the (prepended) sequence the logits and language activations cover.
    """
    n_query = model.qformer.n_query
    batch = input_ids.shape[0]
    if model.vlm_cfg.image_token_id is None:
        return torch.arange(n_query, device=input_ids.device).expand(batch, -1)
    image_mask: Bool[Tensor, "batch pos"] = model.image_token_mask(input_ids)
    counts = image_mask.sum(-1)
    if bool((counts != n_query).any()):
        raise ValueError(f"rows hold {counts.tolist()} image placeholders, expected {n_query} each")
    return image_mask.nonzero()[:, 1].view(batch, n_query)


def cross_attention_layers(model) -> list[int]:
    """Q-Former blocks that cross-attend to the image."""
    return [i for i, block in enumerate(model.qformer.blocks) if block.cross_attn is not None]


def query_patch_attention(
    model, cache: ActivationCache | dict[str, Tensor]
) -> Float[Tensor, "cross_layer image head query grid_h grid_w"]:
    """How much each query reads from each image patch, per cross-attention layer and head.

    Read from the cached ``qformer.blocks.{i}.cross_attn.hook_pattern`` (cache them, e.g. with
    ``names_filter=lambda n: "cross_attn.hook_pattern" in n``). The class token's share (key 0) is
    dropped; the remaining patches are laid out on the ViT's patch grid (row-major, as the conv emits them).
    """
    missing = [i for i in cross_attention_layers(model) if f"qformer.blocks.{i}.cross_attn.hook_pattern" not in cache]
    if missing:
        raise KeyError(f"the cache lacks qformer cross-attention patterns of blocks {missing}; cache them first")
    grid = model.vlm_cfg.image_size // model.vlm_cfg.patch_size
    patterns = torch.stack(
        [cache[f"qformer.blocks.{i}.cross_attn.hook_pattern"] for i in cross_attention_layers(model)], dim=0
    )
    return patterns[..., 1:].unflatten(-1, (grid, grid))
