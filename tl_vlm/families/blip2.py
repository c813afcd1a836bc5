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

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache, Rotary
from tl_vlm.components.kv_cache import check_context
from tl_vlm.config import QFormerConfig, T5Config, ViTVLMConfig
from tl_vlm.convert.hf_modules import (
    ModuleRule, decoder_lm_modules, opt_modules, qformer_modules, t5_modules, vit_modules,
)
from tl_vlm.convert.qformer import qformer_config, qformer_rules
from tl_vlm.convert.rules import WeightMap, linear_rules
from tl_vlm.convert.text_lms import (
    decoder_lm_rules,
    opt_rules,
    t5_ignored,
    t5_rules,
    text_lm_config,
)
from tl_vlm.convert.vits import vit_config, vit_rules
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.beam_search import beam_search
from tl_vlm.sampling import decode
from tl_vlm.towers import DecoderLM, LinearProjector, QFormer, ViTTower
from tl_vlm.towers.t5 import T5LM


@dataclass
class Blip2Config(ViTVLMConfig):
    qformer: QFormerConfig

    def towers(self) -> list:
        return [self.language, self.vision, self.qformer]

    @property
    def encoder_decoder(self) -> bool:
        return isinstance(self.language, T5Config)


class HookedBlip2(HookedVLM):
    family = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    input_fields = HookedVLM.input_fields | {"decoder_input_ids", "decoder_attention_mask"}
    text_input = False  # InstructBLIP: the instruction enters the Q-Former
    vlm_cfg: Blip2Config

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> Blip2Config:
        vc, qc, tc = hf_config.vision_config, hf_config.qformer_config, hf_config.text_config
        if tc.model_type not in ("opt", "llama", "t5"):
            raise NotImplementedError(
                f"{type(hf_config).__name__} with a {tc.model_type!r} language model is not supported yet; "
                "supported: opt, llama, t5"
            )
        vision = vit_config(vc)
        return Blip2Config(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=text_lm_config(tc, getattr(hf_config, "_name_or_path", "")),
            vision=vision,
            image_token_id=getattr(hf_config, "image_token_index", None),  # None: legacy (prepended) form
            hf_config=hf_config,
            qformer=qformer_config(qc, hf_config.num_query_tokens, vision.d_model),
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)

    @classmethod
    def hf_module_rules(cls, cfg: Blip2Config) -> list[ModuleRule]:
        if cfg.language.original_architecture == "opt":
            language = opt_modules("language_model.model.decoder")
        elif cfg.encoder_decoder:
            language = t5_modules("language_model")
        else:
            language = decoder_lm_modules("language_model.model")
        return [
            *vit_modules("vision_model", "vision", cfg.vision),
            *qformer_modules("qformer", cls.text_input),
            ModuleRule("language_projection", "projector.hook_out"),
            *language,
            ModuleRule("language_model.lm_head", "unembed"),
        ]

    @classmethod
    def weight_map(cls, cfg: Blip2Config) -> WeightMap:
        lm = cfg.language
        if lm.original_architecture == "opt":
            language = opt_rules(r"language_model\.model\.decoder", lm)
        elif cfg.encoder_decoder:
            language = t5_rules(r"language_model", lm)
        else:
            language = decoder_lm_rules(r"language_model\.model", lm)
        return WeightMap(
            [
                *vit_rules(r"vision_model", "vision", cfg.vision),
                *qformer_rules(cfg.qformer),
                *linear_rules(r"language_projection", "projector.W", "projector.b"),
                *language,
            ],
            ignore=[r".*\.position_ids", *t5_ignored(r"language_model")],
        )

    @classmethod
    def fp32_parameters(cls, cfg: Blip2Config, dtype: torch.dtype) -> str | None:
        # Loaded in float16 (not bfloat16), HF's BLIP-2 keeps its Q-Former in float32, and Flan-T5 its feed-forward
        # output projections ``wo``. InstructBLIP keeps only its query tokens so (rounded to float16 on use).
        if dtype != torch.float16:
            return None
        kept = [r"qformer\.query_tokens$"] if cls.text_input else [r"qformer\."]
        if cfg.encoder_decoder:
            kept.append(r"(encoder|decoder)\.blocks\.\d+\.mlp\.W_out$")
            if cls.text_input:  # HF matches T5's "wo" inside "word_embeddings" too: the Q-Former's stay float32
                kept.append(r"qformer\.embed\.W_E$")
        return "|".join(kept) or None

    # ------------------------------------------------------------------ structure

    @property
    def capabilities(self) -> Capabilities:
        cfg = self.vlm_cfg
        return Capabilities(
            image_positions=cfg.image_token_id is not None, spatial_cells=False, patches_per_token=0, queries=True,
            encoder_decoder=cfg.encoder_decoder,
        )

    def build(self) -> None:
        cfg = self.vlm_cfg
        lm = cfg.language
        if cfg.encoder_decoder:
            self.attach_language(T5LM(lm))
        else:
            rotary = Rotary.from_hf_config(lm.hf_config) if lm.positional_embedding_type == "rotary" else None
            self.attach_language(DecoderLM(lm, rotary))
        self.vision = ViTTower(cfg.vision)
        self.qformer = QFormer(cfg.qformer, self.text_input)
        self.projector = LinearProjector(cfg.qformer.d_model, lm.d_model)

    def towers(self) -> dict[str, nn.Module]:
        if self.vlm_cfg.encoder_decoder:
            language = {"encoder": self.encoder, "decoder": self.decoder}
        else:
            language = {"language": self.language}
        return {**language, "vision": self.vision, "qformer": self.qformer}

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        lm = hf_model.language_model
        layers = {"vision": list(hf_model.vision_model.encoder.layers), "qformer": list(hf_model.qformer.encoder.layer)}
        if self.vlm_cfg.encoder_decoder:
            return {**layers, "encoder": list(lm.encoder.block), "decoder": list(lm.decoder.block)}
        decoder = lm.model.decoder if self.vlm_cfg.language.original_architecture == "opt" else lm.model
        return {**layers, "language": list(decoder.layers)}

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Query outputs are not patches: each placeholder is query ``patch`` of its image, with no pixel box;
        what each query reads from the patches is ``query_patch_attention``."""
        n_query, n_images = self.qformer.n_query, inputs.pixel_values.shape[0]
        return [dict(image=i, tile=i, patch=q, row=-1, col=-1, kind="query") for i in range(n_images) for q in range(n_query)]

    # ------------------------------------------------------------------ running

    def query_outputs(self, inputs: VLMInputs) -> Float[Tensor, "image query d_qformer"]:
        """The Q-Former's query outputs: what the language model receives (before the projection)."""
        n = self.vision.cfg.n_layers
        image = self.vision.ln_post(self.vision(inputs.pixel_values, keep=[n])[n])
        out = self.qformer(image.to(self.qformer.dtype), inputs.qformer_input_ids, inputs.qformer_attention_mask)
        return out[:, : self.qformer.n_query].to(image.dtype)

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        return self.projector(self.query_outputs(inputs)).flatten(0, 1)

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        if self.vlm_cfg.image_token_id is None:  # legacy form: no placeholders in input_ids
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return super().image_token_mask(input_ids)

    def checked_image_features(self, inputs: VLMInputs, image_mask: Tensor) -> Tensor | None:
        n_query = self.qformer.n_query
        counts = image_mask.sum(-1)
        if inputs.pixel_values is not None and bool(image_mask.any()) and bool((counts != n_query).any()):
            raise ValueError(
                f"input_ids rows hold {counts.tolist()} image placeholder tokens; {self.vlm_cfg.architecture} puts "
                f"num_query_tokens={n_query} placeholders per image, one image per prompt (use model.prepare)"
            )
        return super().checked_image_features(inputs, image_mask)

    def run_vlm(self, inputs: VLMInputs, position_ids: Tensor | None, cache: KVCache | None, stop_at_layer: int | None,
                logits_to_keep: int, generated_from: int | None) -> Tensor:
        if self.vlm_cfg.encoder_decoder:
            if stop_at_layer is not None or cache is not None:
                raise NotImplementedError("stop_at_layer / a KV cache are not supported with an encoder-decoder LM")
            if inputs.decoder_input_ids is None:
                raise ValueError(
                    "Flan-T5 models need decoder_input_ids (as HF's forward does); model.generate starts them itself"
                )
            embeds, mask = self._prompt_embeds(inputs)
            encoded = self.language.encode(embeds, mask)
            return self.language.decode(
                inputs.decoder_input_ids, encoded, mask, inputs.decoder_attention_mask, None, logits_to_keep
            )
        if inputs.decoder_input_ids is not None:
            raise ValueError("decoder_input_ids are for encoder-decoder (Flan-T5) models; this LM is decoder-only")
        if self.vlm_cfg.image_token_id is not None:
            return super().run_vlm(inputs, position_ids, cache, stop_at_layer, logits_to_keep, generated_from)
        mask = inputs.attention_mask
        n_query = self.qformer.n_query
        if inputs.pixel_values is None:
            # Legacy decode steps: the cache holds the queries, the caller's mask covers only the text.
            if cache is not None and mask is not None and cache.length + inputs.shape[1] == mask.shape[1] + n_query:
                mask = torch.cat([mask.new_ones(mask.shape[0], n_query), mask], dim=1)
            embeds = self.language.embed_inputs(inputs.input_ids)
        else:
            embeds, mask = self._prompt_embeds(inputs)
        return self.language(embeds, mask, position_ids, cache, stop_at_layer, logits_to_keep)

    def _prompt_embeds(self, inputs: VLMInputs) -> tuple[Tensor, Tensor | None]:
        """The language model's input embeddings and mask, with the projected queries at their positions."""
        ids, mask = inputs.input_ids, inputs.attention_mask
        if self.vlm_cfg.image_token_id is not None:
            return self.embed_prompt(inputs, None)[0], mask
        if inputs.pixel_values is None:
            return self.language.embed_inputs(ids), mask
        n_query, batch = self.qformer.n_query, ids.shape[0]
        features = self.image_features(inputs)
        if features.shape[0] != batch * n_query:
            raise ValueError(
                f"the images give {features.shape[0] // n_query} query sets for {batch} prompts; the legacy BLIP-2 "
                "form prepends one image's queries to each prompt"
            )
        queries = torch.ones(batch, n_query, dtype=torch.bool, device=ids.device)
        image_mask = torch.cat([queries, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
        embeds = self.language.embed_inputs(torch.cat([ids.new_zeros(batch, n_query), ids], dim=1), features, image_mask)
        return embeds, None if mask is None else torch.cat([queries.to(mask.dtype), mask], dim=1)

    def prompt_offset(self) -> int:
        legacy = self.vlm_cfg.image_token_id is None and not self.vlm_cfg.encoder_decoder
        return self.qformer.n_query if legacy else 0

    def scoring_inputs(self, inputs: VLMInputs) -> VLMInputs:
        """Flan-T5's forward needs decoder ids: the decoder start token, the first step generate takes."""
        if not self.vlm_cfg.encoder_decoder or inputs.decoder_input_ids is not None:
            return inputs
        start = self.generation_config.decoder_start_token_id
        start = self.vlm_cfg.language.decoder_start_token_id if start is None else start
        ids = torch.full((inputs.input_ids.shape[0], 1), start, dtype=torch.long, device=inputs.input_ids.device)
        return dataclasses.replace(inputs, decoder_input_ids=ids)

    def prefill_positions(self, inputs: VLMInputs, mask: Tensor) -> Tensor:
        if self.vlm_cfg.image_token_id is None and inputs.pixel_values is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], self.qformer.n_query), mask], dim=1)
        return super().prefill_positions(inputs, mask)

    def generate_tokens(self, inputs: VLMInputs, settings, use_past_kv_cache: bool, generator) -> Tensor:
        """Flan-T5: encode the prompt once, then decode from the decoder start token, as HF's generate."""
        if not self.vlm_cfg.encoder_decoder:
            return super().generate_tokens(inputs, settings, use_past_kv_cache, generator)
        lm = self.language
        embeds, mask = self._prompt_embeds(inputs)
        encoded = lm.encode(embeds, mask)
        batch = encoded.shape[0]
        start = settings.decoder_start_token_id
        if start is None:
            start = lm.cfg.decoder_start_token_id
        ids = torch.full((batch, 1), start, dtype=torch.long, device=encoded.device)
        n_new = settings.max_new_tokens if settings.max_new_tokens is not None else max(settings.max_length - 1, 1)
        check_context(lm.decoder.cfg, 1 + n_new)
        cache = KVCache(lm.decoder.cfg, batch, 1 + n_new, ids.device, encoded.dtype) if use_past_kv_cache else None

        def step(token: Tensor, ids: Tensor) -> Tensor:
            return lm.decode(token[:, None] if cache is not None else ids, encoded, mask, None, cache, logits_to_keep=1)

        logits = lm.decode(ids, encoded, mask, None, cache, logits_to_keep=1)
        if settings.num_beams > 1:

            def select(rows: Tensor) -> None:
                nonlocal encoded, mask
                cache.select_rows(rows)
                encoded, mask = encoded[rows], mask[rows] if mask is not None else None

            return beam_search(logits, ids, n_new, settings, torch.ones_like(ids), step, select)
        return decode(logits, ids, n_new, settings, torch.ones_like(ids), generator, step)


class HookedInstructBlip(HookedBlip2):
    family = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    input_fields = HookedBlip2.input_fields | {"qformer_input_ids", "qformer_attention_mask"}
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
