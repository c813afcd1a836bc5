"""Llama 3.2 Vision (``MllamaForConditionalGeneration``): a tiled ViT whose features the language model reads by
gated cross-attention, never as token positions.

- Vision: ``vision`` (local layers) and ``vision_global`` (gated layers), one row per image slot with the tiles
  side by side (``towers/tiled_vit.py``); the projector reads the global output concatenated with the local
  layers ``intermediate_layers_indices`` (interleaved per channel, as HF stacks them) -> ``projector.hook_in`` ->
  one linear map -> ``projector.hook_out`` ``[image, tile * n_pos, d_text]`` (padding positions of each tile
  dropped, class token kept).
- Language: a Llama-3 decoder with ``GatedCrossBlock`` at ``cross_attention_layers`` (``towers/cross_attention_lm.py``).
  Which text positions see which image tiles is ``cross_attention_mask`` ``[batch, pos, image, tile]`` (the
  processor's: each ``<|image|>`` token and the text after it, up to the next image); rows that see no image get
  no mask at all (they attend to every image position, padding tiles included) and their cross-layer MLP output
  is dropped (HF's full-text-row mask).
- Generation: the image keys / values are computed at the prompt pass and cached; each generated token reuses
  the prompt's last mask row, as HF's generate does.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import Rotary
from tl_vlm.components.cross_kv_cache import CrossAttentionKVCache
from tl_vlm.config import TowerConfig, VLMConfig
from tl_vlm.convert.hf_modules import ModuleRule
from tl_vlm.convert.rules import Rule, WeightMap, attention_rules, linear_rules, mlp_rules, norm_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers.cross_attention_lm import CrossAttentionLM, ImageContext
from tl_vlm.towers.projector import LinearProjector
from tl_vlm.towers.tiled_vit import GlobalViTTower, TiledViTConfig, TiledViTTower, tile_mask

# HF's text model has 8 embedding rows past its output vocabulary; the <|image|> token is the first of them.
_EXTRA_EMBEDDINGS = 8


@dataclass
class MllamaConfig(VLMConfig):
    vision: TiledViTConfig
    vision_global: TiledViTConfig
    cross_attention_layers: tuple[int, ...]
    supported_aspect_ratios: tuple[tuple[int, int], ...]  # (tile rows, tile columns) of aspect-ratio ids 1, 2, ...
    d_projector_in: int

    def towers(self) -> list[TowerConfig]:
        return [self.language, self.vision, self.vision_global]

    def tiles_of(self, aspect_ratio_id: int) -> int:
        """Tiles an image of this aspect-ratio id fills (an empty image slot, id 0, has its first tile marked)."""
        rows, cols = self.supported_aspect_ratios[aspect_ratio_id - 1] if aspect_ratio_id > 0 else (1, 1)
        return rows * cols


class HookedMllama(HookedVLM):
    family = "mllama"
    architectures = ("MllamaForConditionalGeneration",)
    input_fields: ClassVar[frozenset[str]] = frozenset(
        {"input_ids", "pixel_values", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"}
    )
    vlm_cfg: MllamaConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def hf_module_rules(cls, cfg) -> list[ModuleRule]:
        """The language model's layer outputs, final norm and head; the tiled vision encoder runs HF's
        ``[image * tile, position]`` rows (tl_vlm: ``[image, tile * position]``), so its names are not mapped, nor
        the sublayers, which differ between self- and cross-attention layers."""
        return [ModuleRule("model.language_model.layers.{i}", "blocks.{i}.hook_resid_post", "language"),
                ModuleRule("model.language_model.norm", "ln_final"), ModuleRule("lm_head", "unembed")]

    @classmethod
    def config_from_hf(cls, hf_config) -> MllamaConfig:
        tc, vc = hf_config.text_config, hf_config.vision_config
        language = decoder_lm_config(tc, getattr(hf_config, "_name_or_path", ""), attn_biases=(), qk_norm=False)
        vision = TiledViTConfig(
            n_layers=vc.num_hidden_layers, d_model=vc.hidden_size, n_heads=vc.attention_heads,
            d_head=vc.hidden_size // vc.attention_heads, d_mlp=vc.intermediate_size, act_fn=vc.hidden_act,
            normalization_type="LN", eps=vc.norm_eps, mlp_bias=True, attention_dir="bidirectional",
            positional_embedding_type="standard", original_architecture="MllamaVisionModel", hf_config=vc,
            image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels, class_token=True,
            max_num_tiles=vc.max_num_tiles, n_aspect_ratios=len(vc.supported_aspect_ratios),
            intermediate_layers=tuple(vc.intermediate_layers_indices),
        )
        return MllamaConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family, language=language, vision=vision,
            vision_global=vision.replace(n_layers=vc.num_global_layers, intermediate_layers=()),
            image_token_id=hf_config.image_token_id, hf_config=hf_config,
            cross_attention_layers=tuple(tc.cross_attention_layers),
            supported_aspect_ratios=tuple(tuple(r) for r in vc.supported_aspect_ratios),
            d_projector_in=vc.vision_output_dim,
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        # In memory (transformers 5) keys sit under model.*; older files nest the LM as language_model.model.*.
        key = re.sub(r"^model\.(?=language_model\.|vision_model\.|multi_modal_projector\.)", "", key)
        key = re.sub(r"^language_model\.model\.", "language_model.", key)
        return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)

    @classmethod
    def weight_map(cls, cfg: MllamaConfig) -> WeightMap:
        v, d = r"vision_model", cfg.vision.d_head
        local, glob = rf"{v}\.transformer\.layers\.(\d+)", rf"{v}\.global_transformer\.layers\.(\d+)"
        cross = r"language_model\.layers\.(\d+)"
        rules = [
            Rule(rf"{v}\.patch_embedding\.weight", "vision.W_patch"),
            Rule(rf"{v}\.class_embedding", "vision.class_embedding"),
            Rule(rf"{v}\.gated_positional_embedding\.embedding", "vision.pos_embed.W_pos"),
            Rule(rf"{v}\.gated_positional_embedding\.tile_embedding\.weight", "vision.pos_embed.W_tile"),
            Rule(rf"{v}\.gated_positional_embedding\.gate", "vision.pos_embed.gate"),
            Rule(rf"{v}\.pre_tile_positional_embedding\.embedding\.weight", "vision.tile_embed.W"),
            Rule(rf"{v}\.pre_tile_positional_embedding\.gate", "vision.tile_embed.gate"),
            Rule(rf"{v}\.post_tile_positional_embedding\.embedding\.weight", "vision_global.tile_embed.W"),
            Rule(rf"{v}\.post_tile_positional_embedding\.gate", "vision_global.tile_embed.gate"),
            *norm_rules(rf"{v}\.layernorm_pre", "vision.ln_pre"),
            *norm_rules(rf"{v}\.layernorm_post", "vision.ln_post"),
        ]
        for hf, tl in ((local, r"vision.blocks.\1"), (glob, r"vision_global.blocks.\1")):
            rules += [
                *attention_rules(rf"{hf}\.self_attn", f"{tl}.attn", d),
                *norm_rules(rf"{hf}\.input_layernorm", f"{tl}.ln1"),
                *norm_rules(rf"{hf}\.post_attention_layernorm", f"{tl}.ln2"),
                *mlp_rules(rf"{hf}\.mlp", f"{tl}.mlp", "fc1", "fc2"),
            ]
        rules += [
            Rule(rf"{glob}\.gate_attn", r"vision_global.blocks.\1.gate_attn"),
            Rule(rf"{glob}\.gate_ffn", r"vision_global.blocks.\1.gate_ffn"),
            *linear_rules(r"multi_modal_projector", "projector.W", "projector.b"),
            *attention_rules(rf"{cross}\.cross_attn", r"blocks.\1.cross_attn", cfg.language.d_head),
            *norm_rules(rf"{cross}\.cross_attn\.q_norm", r"blocks.\1.cross_attn.q_norm"),
            *norm_rules(rf"{cross}\.cross_attn\.k_norm", r"blocks.\1.cross_attn.k_norm"),
            Rule(rf"{cross}\.cross_attn_attn_gate", r"blocks.\1.gate_attn"),
            Rule(rf"{cross}\.cross_attn_mlp_gate", r"blocks.\1.gate_ffn"),
            *decoder_lm_rules(r"language_model", cfg.language),
        ]
        return WeightMap(rules)

    def build(self) -> None:
        cfg = self.vlm_cfg
        n_embeddings = cfg.language.d_vocab + _EXTRA_EMBEDDINGS
        rotary = Rotary.from_hf_config(cfg.language.hf_config)
        self.attach_language(CrossAttentionLM(cfg.language, rotary, cfg.cross_attention_layers, n_embeddings))
        self.vision = TiledViTTower(cfg.vision)
        self.vision_global = GlobalViTTower(cfg.vision_global)
        self.projector = LinearProjector(cfg.d_projector_in, cfg.language.d_model)

    def towers(self) -> dict[str, torch.nn.Module]:
        return {"language": self.language, "vision": self.vision, "vision_global": self.vision_global}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(image_positions=False, spatial_cells=False, patches_per_token=0, tiles=True,
                            cross_attention=True)

    def new_kv_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> CrossAttentionKVCache:
        return CrossAttentionKVCache(self.cfg, batch, max_len, device, dtype, self.vlm_cfg.cross_attention_layers)

    def prepare(self, images=None, text=None, **processor_kwargs) -> VLMInputs:
        """As HookedVLM's; a flat list of images for a list of prompts is split by each prompt's ``<|image|>``
        tokens (HF's processor would take it as one prompt's images). ``pixel_values`` hold one entry per prompt
        (all its image slots), so each row owns one."""
        flat = isinstance(images, (list, tuple)) and not any(isinstance(i, (list, tuple)) for i in images)
        if flat and isinstance(text, list) and self.processor is not None:
            counts = [t.count(self.processor.image_token) for t in text]
            if sum(counts) == len(images):
                starts = list(itertools.accumulate([0, *counts]))
                images = [list(images[a:b]) for a, b in zip(starts, starts[1:])]
        inputs = super().prepare(images=images, text=text, **processor_kwargs)
        return dataclasses.replace(inputs, row_images=(1,) * len(inputs) if inputs.pixel_values is not None else None)

    # ------------------------------------------------------------------ running

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "batch image_pos d_model"]:
        """Projected features of every image slot of each row, ``image_pos = image * tile * n_pos`` (what the
        cross-attention layers read)."""
        cfg = self.vlm_cfg.vision
        pixels = inputs.pixel_values
        batch = pixels.shape[0]
        ids = inputs.aspect_ratio_ids.reshape(-1)
        mask = tile_mask(inputs.aspect_ratio_mask.reshape(len(ids), -1), cfg, self.vision.W_patch.dtype)
        local, kept = self.vision(pixels.flatten(0, 1), ids, mask)
        final = self.vision_global(local, ids, mask)
        # HF stacks the intermediate layers on a last axis, so their channels interleave when flattened.
        layers = [final] + ([torch.stack([kept[i] for i in cfg.intermediate_layers], dim=-1).flatten(-2)]
                            if cfg.intermediate_layers else [])
        tiles = [x.view(len(ids), cfg.max_num_tiles, cfg.padded_positions, -1)[:, :, : cfg.n_positions] for x in layers]
        features = torch.cat(tiles, dim=-1).flatten(1, 2)
        return self.projector(features).reshape(batch, -1, self.cfg.d_model)

    def run_vlm(
        self,
        inputs: VLMInputs,
        position_ids: Tensor | None,
        cache: CrossAttentionKVCache | None,
        stop_at_layer: int | None,
        logits_to_keep: int,
        generated_from: int | None,
    ) -> Tensor:
        embeds = self.language.embed_inputs(inputs.input_ids)
        images = self.image_context(inputs, cache, generated_from)
        return self.language(embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep, images)

    def image_context(
        self, inputs: VLMInputs, cache: CrossAttentionKVCache | None, generated_from: int | None
    ) -> ImageContext | None:
        """What the cross-attention layers read this pass: the images and mask of the prompt, or at a cached decode
        step the prompt's last mask row (the image keys / values are in the cache); None without images."""
        batch, pos = inputs.input_ids.shape
        if cache is not None and cache.length > 0:
            if inputs.pixel_values is not None:
                raise ValueError("the KV cache already holds the prompt's images; pass only the new tokens")
            if cache.last_mask_row is None:
                return None
            return self.cross_mask(cache.last_mask_row[:, None].expand(-1, pos, -1, -1), None)
        rows = self.checked_cross_mask(inputs, generated_from)
        if rows is None:
            return None
        if cache is not None:
            cache.last_mask_row = rows[:, -1]
        return self.cross_mask(rows, self.image_features(inputs))

    def cross_mask(self, rows: Int[Tensor, "batch pos image tile"], features: Tensor | None) -> ImageContext:
        """HF's additive cross-attention mask and full-text-row mask, computed as HF does (they round the same)."""
        dtype = self.embed.W_E.dtype
        lowest = torch.finfo(dtype).min
        batch, pos = rows.shape[:2]
        allowed = rows.repeat_interleave(self.vlm_cfg.vision.n_positions, dim=3).view(batch, pos, -1).unsqueeze(1)
        blocked = (1.0 - allowed).to(dtype)
        mask = blocked.masked_fill(blocked.to(torch.bool), lowest)
        text_rows = (mask != lowest).any(dim=-1).type_as(mask)[..., None]
        return ImageContext(features, mask * text_rows, text_rows[:, 0])

    def checked_cross_mask(self, inputs: VLMInputs, generated_from: int | None) -> Tensor | None:
        """The cross-attention mask rows of this pass after checking images, tiles, placeholders and mask against
        each other (never a silent drop); None for a text-only prompt."""
        cfg, token = self.vlm_cfg, self._image_token_name()
        ids = inputs.input_ids
        placeholders = self.image_token_mask(ids)
        if generated_from is not None:  # generated ids are plain tokens, as in HF's decode steps
            placeholders[:, generated_from:] = False
        image_inputs = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        if inputs.pixel_values is None:
            if placeholders.any():
                raise ValueError(
                    f"input_ids hold {int(placeholders.sum())} {token} tokens but no pixel_values were given; pass the "
                    "processor's pixel_values (model.prepare(images=..., text=...)) or drop the image tokens"
                )
            given = [name for name in image_inputs if getattr(inputs, name) is not None]
            if given:
                raise ValueError(f"{given} were given without pixel_values; refusing to drop them silently")
            return None
        missing = [name for name in image_inputs if getattr(inputs, name) is None]
        if missing:
            raise ValueError(
                f"pixel_values need {missing} too (which tiles are real, and which tokens see which image); "
                "pass every output of the model's processor (model.prepare)"
            )
        pixels, ratio_ids, tiles = inputs.pixel_values, inputs.aspect_ratio_ids, inputs.aspect_ratio_mask
        batch, pos = ids.shape
        v = cfg.vision
        expected = (batch, pixels.shape[1] if pixels.ndim == 6 else -1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
        if tuple(pixels.shape) != expected:
            raise ValueError(
                f"pixel_values must be [batch, image, tile, channel, height, width] = {expected}, got "
                f"{tuple(pixels.shape)}; build them with the model's processor (model.prepare)"
            )
        n_slots = pixels.shape[1]
        if tuple(ratio_ids.shape) != (batch, n_slots) or tuple(tiles.shape) != (batch, n_slots, v.max_num_tiles):
            raise ValueError(
                f"aspect_ratio_ids {tuple(ratio_ids.shape)} / aspect_ratio_mask {tuple(tiles.shape)} do not fit "
                f"pixel_values {tuple(pixels.shape)}; expected ({batch}, {n_slots}) and ({batch}, {n_slots}, {v.max_num_tiles})"
            )
        if int(ratio_ids.min()) < 0 or int(ratio_ids.max()) > len(cfg.supported_aspect_ratios):
            raise ValueError(f"aspect_ratio_ids must lie in [0, {len(cfg.supported_aspect_ratios)}], got {ratio_ids.tolist()}")
        n_tiles = torch.tensor([cfg.tiles_of(i) for i in range(len(cfg.supported_aspect_ratios) + 1)],
                               device=ratio_ids.device)[ratio_ids]
        expected = torch.arange(v.max_num_tiles, device=tiles.device) < n_tiles[..., None].to(tiles.device)
        wrong = (expected != tiles.bool()).any(-1).nonzero()
        if len(wrong):
            b, i = wrong[0].tolist()
            n = int(n_tiles[b, i])
            raise ValueError(
                f"aspect_ratio_mask of row {b}, image {i} is {tiles[b, i].tolist()} but its aspect_ratio_id "
                f"{int(ratio_ids[b, i])} means {n} tile(s) (the first {n} marked); build both with the processor"
            )
        images_per_row, tokens_per_row = (ratio_ids > 0).sum(1).tolist(), placeholders.sum(1).tolist()
        for b, (n_images, n_tokens) in enumerate(zip(images_per_row, tokens_per_row)):
            if n_images != n_tokens:
                raise ValueError(
                    f"row {b} of input_ids holds {n_tokens} {token} tokens but {n_images} images (aspect_ratio_ids > 0); "
                    "each image needs its token; build prompt and images together with the processor (model.prepare)"
                )
        rows = inputs.cross_attention_mask
        if generated_from is not None and rows.shape[1] == generated_from < pos:
            rows = torch.cat([rows, rows[:, -1:].expand(-1, pos - generated_from, -1, -1)], dim=1)  # as HF's generate
        if tuple(rows.shape) != (batch, pos, n_slots, v.max_num_tiles):
            raise ValueError(
                f"cross_attention_mask has shape {tuple(rows.shape)} but must be [batch, pos, image, tile] = "
                f"{(batch, pos, n_slots, v.max_num_tiles)}; build it with the processor (model.prepare)"
            )
        if (rows.bool() & ~tiles.bool()[:, None]).any():
            raise ValueError(
                "cross_attention_mask lets tokens see tiles that aspect_ratio_mask marks as padding; build both "
                "with the processor (model.prepare)"
            )
        return rows

    def _image_token_name(self) -> str:
        token = self.tokenizer.convert_ids_to_tokens(self.vlm_cfg.image_token_id) if self.tokenizer is not None else None
        return token or f"image (id {self.vlm_cfg.image_token_id})"

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        raise NotImplementedError(
            "Mllama's language positions hold no image features (images enter by cross-attention), so there is no "
            "spatial index of language tokens; model.vision_cells(inputs) indexes the vision towers' positions"
        )

    def vision_cells(self, inputs: VLMInputs) -> list[dict]:
        """One dict per position of the vision towers' rows (``[image, tile * n_pos]``, row-major): ``image`` (the
        row: batch row * image slots + slot), ``batch``, ``slot``, ``tile``, ``position`` (in the tile),
        ``kind`` ("cls", "patch", "pad": a padding position, or any position of a padding tile), patch ``row`` /
        ``col`` and the pixel box ``x0, y0, x1, y1`` on the processor's tile canvas (the resized image, tiles in
        row-major order; -1 where there is no box), and ``key``: the position's index among the cross-attention
        keys of its batch row (``blocks.{i}.cross_attn.hook_pattern``'s last axis; padding tiles are keys too, as
        in HF), -1 for the padding positions the projector drops."""
        cfg, v = self.vlm_cfg, self.vlm_cfg.vision
        cells = []
        for b, slot in itertools.product(range(inputs.aspect_ratio_ids.shape[0]), range(inputs.aspect_ratio_ids.shape[1])):
            ratio = int(inputs.aspect_ratio_ids[b, slot])
            cols = cfg.supported_aspect_ratios[ratio - 1][1] if ratio > 0 else 1
            for tile, position in itertools.product(range(v.max_num_tiles), range(v.padded_positions)):
                real = bool(inputs.aspect_ratio_mask[b, slot, tile]) and ratio > 0
                patch = position - 1
                kind = "pad" if not real or position >= v.n_positions else ("cls" if position == 0 else "patch")
                key = (slot * v.max_num_tiles + tile) * v.n_positions + position if position < v.n_positions else -1
                cell = dict(image=b * inputs.aspect_ratio_ids.shape[1] + slot, batch=b, slot=slot, tile=tile,
                            position=position, kind=kind, key=key, row=-1, col=-1, x0=-1, y0=-1, x1=-1, y1=-1)
                if kind == "patch":
                    row, col = divmod(patch, v.grid)
                    x0 = (tile % cols) * v.image_size + col * v.patch_size
                    y0 = (tile // cols) * v.image_size + row * v.patch_size
                    cell.update(row=row, col=col, x0=x0, y0=y0, x1=x0 + v.patch_size, y1=y0 + v.patch_size)
                cells.append(cell)
        return cells

    def hf_layers(self, hf_model) -> dict[str, list[torch.nn.Module]]:
        vision = hf_model.model.vision_model
        return {"language": list(hf_model.model.language_model.layers), "vision": list(vision.transformer.layers),
                "vision_global": list(vision.global_transformer.layers)}

