"""Dual encoders (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``) as one hooked model: ``vision.*`` and ``text.*``
towers.

``HookedCLIP`` is a ``HookedRootModule``, not a ``HookedVLM``: a HookedVLM's contract is a generative language
model at the top level (``blocks``, ``unembed``, token logits, ``generate``), which a dual encoder does not have.
Both towers are prefixed as the design names them, and their shared parts come from the same places as a VLM's:
the ViT (``towers/vision``), blocks and attention (``components``), the weight rules and loaders
(``convert``, ``hooked_vlm``'s safetensors streaming), tower views (``tower_view``) and the hook-point cache.

``model(input_ids=, pixel_values=)`` returns HF's ``logits_per_image`` ``[image, text]``: cosine similarities
times ``exp(logit_scale)`` (plus ``logit_bias``: SigLIP); ``encode_image`` / ``encode_text`` return HF's
``get_image_features`` / ``get_text_features`` (unnormalised). ``model.tower("vision")`` / ``model.tower("text")``
run TL's patching functions on one tower, the other tower's inputs attached.

SigLIP 2 (NaFlex) is SigLIP with a vision tower that takes each image at its own aspect ratio
(``towers/naflex_vit``): ``pixel_values`` are padded rows of flattened patches, with ``pixel_attention_mask`` and
``spatial_shapes``, as its processor returns them; ``model.image_inputs(images)`` gives all three.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.utilities import remove_batch_dim as drop_batch_dim

from tl_vlm import weight_processing
from tl_vlm.config import ViTConfig
from tl_vlm.convert.export import write_into_hf
from tl_vlm.convert.dual_encoders import normalize_in_proj, pooled_vit_rules, text_encoder_config, text_encoder_rules
from tl_vlm.convert.model_loading import (
    cast_keeping_float32, check_complete, in_memory_target, iter_safetensors, open_checkpoint, optional_processor,
    set_tower_placement, sync_tower_placement,
)
from tl_vlm.convert.naflex_vit import naflex_vit_config, naflex_vit_rules
from tl_vlm.convert.rules import Rule, WeightMap, load_weights
from tl_vlm.convert.vits import vit_config
from tl_vlm.families.llava import grid_cells, original_pixels, processed_pixels
from tl_vlm.hooked_vlm import HookedVLM, _check_token_ids, _not_result
from tl_vlm.inputs import VLMInputs
from tl_vlm.tower_view import TowerView
from tl_vlm.towers.naflex_vit import NaFlexViT, naflex_cells
from tl_vlm.towers.pooled_vit import PooledViT
from tl_vlm.towers.text_encoder import TextEncoder, TextEncoderConfig


@dataclass
class DualEncoderConfig:
    architecture: str
    family: str  # "clip" or "siglip" (SigLIP 2 too: its logits, loss and text tower are SigLIP's)
    vision: ViTConfig
    text: TextEncoderConfig
    d_proj: int  # width of the shared embedding space
    vision_pool: str  # "cls" (CLIP: class token + projection) or "map" (SigLIP: attention pooling, no projection)
    logit_bias: bool  # SigLIP's sigmoid logits have a learned bias
    text_padding: str | bool  # how model.prepare pads texts: SigLIP was trained on "max_length", CLIP pads to the longest
    hf_config: Any
    naflex: bool = False  # SigLIP 2: images as padded patch rows with a mask and their (h, w) grids

    def towers(self) -> list:
        return [self.vision, self.text]


class HookedCLIP(HookedRootModule):
    architectures: ClassVar[tuple[str, ...]] = ("CLIPModel", "SiglipModel", "Siglip2Model")
    # pixel_attention_mask / spatial_shapes: SigLIP 2's (the fixed-size towers refuse them)
    input_fields: ClassVar[frozenset[str]] = frozenset(
        {"input_ids", "pixel_values", "attention_mask", "pixel_attention_mask", "spatial_shapes"})
    vlm_cfg: DualEncoderConfig

    def __init__(self, cfg: DualEncoderConfig, processor=None):
        super().__init__()
        self.vlm_cfg = cfg
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name_or_path = ""
        if cfg.naflex:
            self.vision = NaFlexViT(cfg.vision)
        else:
            self.vision = PooledViT(cfg.vision, cfg.vision_pool, cfg.d_proj if cfg.vision_pool == "cls" else None)
        self.text = TextEncoder(cfg.text)
        # Shapes as HF's: CLIP's logit_scale is a scalar, SigLIP's scale and bias have one element.
        scalar = () if cfg.family == "clip" else (1,)
        self.logit_scale = nn.Parameter(torch.zeros(scalar))
        self.logit_bias = nn.Parameter(torch.zeros(scalar)) if cfg.logit_bias else None
        self.setup()

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text}

    def tower(self, name: str) -> TowerView:
        """One tower as a TransformerLens model (tower-relative hook names; runs both towers)."""
        return TowerView(self, name)

    # ---------------------------------------------------------------- conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> DualEncoderConfig:
        kind = hf_config.model_type
        if kind not in ("clip", "siglip", "siglip2"):
            raise NotImplementedError(
                f"dual encoder {kind!r} is not supported; HookedCLIP converts CLIPModel, SiglipModel and Siglip2Model"
            )
        naflex = kind == "siglip2"
        clip = kind == "clip"
        vision, text = hf_config.vision_config, hf_config.text_config
        if not clip and not vision.vision_use_head:
            raise NotImplementedError("a SigLIP vision tower without its pooling head gives no image embedding")
        d_proj = hf_config.projection_dim if clip else text.projection_size
        if not clip and d_proj != vision.hidden_size:
            raise ValueError(f"SigLIP's text head gives {d_proj} dims but its pooled images have {vision.hidden_size}")
        return DualEncoderConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else
            {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[kind],
            family="siglip" if naflex else kind,
            vision=naflex_vit_config(vision) if naflex else vit_config(vision),
            text=text_encoder_config(text, d_proj),
            d_proj=d_proj,
            vision_pool="cls" if clip else "map",
            logit_bias=not clip,
            text_padding=True if clip else "max_length",
            hf_config=hf_config,
            naflex=naflex,
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return normalize_in_proj(key)

    @classmethod
    def weight_map(cls, cfg: DualEncoderConfig) -> WeightMap:
        clip = cfg.family == "clip"
        if cfg.naflex:
            vision = naflex_vit_rules(r"vision_model", "vision", cfg.vision)
        else:
            vision = pooled_vit_rules(r"vision_model", "vision", cfg.vision, r"visual_projection" if clip else None)
        return WeightMap(
            [
                *vision,
                *text_encoder_rules(r"text_model", "text", cfg.text, r"text_projection" if clip else r"text_model\.head"),
                Rule(r"logit_scale", "logit_scale"),
                Rule(r"logit_bias", "logit_bias"),
            ],
            ignore=[r".*\.position_ids"],
        )

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        fold_value_biases: bool = False,
        revision: str | None = None,
        load_processor: bool = True,
    ) -> "HookedCLIP":
        """Load a CLIP / SigLIP / SigLIP 2 checkpoint (local directory or hub id) straight from its safetensors files."""
        path, hf_config, dtype = open_checkpoint(model_name, revision, False, dtype)
        processor = optional_processor(HookedVLM, path, False) if load_processor else None
        model = cls._convert(hf_config, iter_safetensors(path), device, dtype, processor)
        model.name_or_path = str(model_name)
        model.process_weights(fold_ln, center_writing_weights, fold_value_biases)
        return model

    @classmethod
    def from_hf_model(
        cls,
        hf_model,
        processor=None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        fold_value_biases: bool = False,
    ) -> "HookedCLIP":
        """Convert an in-memory ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model``; weights are views of its storage
        where device and dtype agree (weight processing writes new tensors)."""
        if type(hf_model).__name__ not in cls.architectures:
            raise ValueError(f"HookedCLIP converts {list(cls.architectures)}, got {type(hf_model).__name__}")
        device, dtype, keep_float32 = in_memory_target(hf_model, device, dtype)
        model = cls._convert(hf_model.config, hf_model.state_dict().items(), device, dtype, processor, keep_float32)
        model.name_or_path = getattr(hf_model, "name_or_path", "") or ""
        model.process_weights(fold_ln, center_writing_weights, fold_value_biases)
        return model

    @classmethod
    def _convert(cls, hf_config, tensors, device, dtype, processor, keep_float32: bool = False) -> "HookedCLIP":
        cfg = cls.config_from_hf(hf_config)
        set_tower_placement(cfg, device, dtype)
        model = cls(cfg, processor)
        loaded = load_weights(model, cls.weight_map(cfg), tensors, cls.normalize_key, device, dtype, None, keep_float32)
        check_complete(model, loaded)
        return cast_keeping_float32(model, dtype, device).eval()

    def process_weights(self, fold_ln: bool = False, center_writing_weights: bool = False,
                        fold_value_biases: bool = False) -> None:
        """TL weight processing where it keeps the embeddings unchanged: ``fold_ln`` folds each block's norms into
        its attention and MLP (both towers; the final / pooling norms stay, their outputs are pooled and projected);
        ``center_writing_weights`` centres the text tower's writers (every reader of its stream is a LayerNorm);
        ``fold_value_biases`` moves b_V into b_O (both towers)."""
        for tower in self.towers().values():
            if fold_ln:
                weight_processing.fold_layer_norms(tower, final=False)
            if fold_value_biases:
                weight_processing.fold_value_bias(tower)
        if center_writing_weights:
            weight_processing.center_writing(self.text)
        self.setup()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save as a HF checkpoint (config, safetensors under HF's keys, processor): HF's ``AutoModel`` and
        ``HookedCLIP.from_pretrained`` both load it. Unprocessed weights only (``fold_ln`` has no HF form)."""
        from transformers import AutoModel

        hf = AutoModel.from_config(self.vlm_cfg.hf_config).to(dtype=self.vlm_cfg.text.dtype)
        write_into_hf(self, hf, self.weight_map(self.vlm_cfg), self.normalize_key)
        hf.save_pretrained(path)
        if self.processor is not None:
            self.processor.save_pretrained(path)

    def _apply(self, fn, recurse: bool = True):
        """``.to`` / ``.half()``: each tower's ``cfg.dtype`` / ``cfg.device`` follow its weights."""
        super()._apply(fn, recurse)
        if "vision" in self._modules:
            sync_tower_placement(self.towers().values())
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---------------------------------------------------------------- inputs

    def prepare(self, images=None, text: str | list[str] | None = None, **processor_kwargs) -> VLMInputs:
        """Run the HF processor on texts (and images, if given; ``pixel_values`` takes images alone). SigLIP's texts
        are padded to the text tower's length, as it was trained (``padding=`` overrides). Over-long texts are an
        error at the run unless ``truncation=True`` (SigLIP 2's processor would truncate them silently). SigLIP 2's
        images are resized to at most the image processor's ``max_num_patches`` (``max_num_patches=`` overrides)."""
        if self.processor is None:
            raise ValueError("this model was loaded without a processor; pass input_ids and pixel_values instead")
        if text is None:
            raise ValueError("prepare needs text; for images alone use model.image_inputs(images)")
        processor_kwargs.setdefault("padding", self.vlm_cfg.text_padding)
        processor_kwargs.setdefault("truncation", False)
        if self.vlm_cfg.naflex and images is not None:
            # Siglip2Processor's call defaults (16px patches, 256 of them) would override its image processor's own.
            image_processor = self.processor.image_processor
            processor_kwargs.setdefault("patch_size", image_processor.patch_size)
            processor_kwargs.setdefault("max_num_patches", image_processor.max_num_patches)
        if processor_kwargs["padding"] == "max_length":
            processor_kwargs.setdefault("max_length", self.vlm_cfg.text.n_ctx)
        batch = self.processor(images=images, text=text, return_tensors="pt", **processor_kwargs)
        return VLMInputs.from_mapping({k: v for k, v in batch.items() if k in self.input_fields}).to(self.device)

    def pixel_values(self, images) -> Float[Tensor, "image channel height width"]:
        """The image processor's pixel values for ``images`` (what ``encode_image`` takes)."""
        if self.vlm_cfg.naflex:
            raise ValueError(
                "SigLIP 2's pixel_values need their pixel_attention_mask and spatial_shapes; use "
                "model.encode_image(**model.image_inputs(images))"
            )
        return self.image_inputs(images)["pixel_values"]

    def image_inputs(self, images) -> dict[str, Tensor]:
        """The image processor's outputs for ``images``: what ``encode_image`` takes as keywords (``pixel_values``;
        SigLIP 2 adds ``pixel_attention_mask`` and ``spatial_shapes``)."""
        if self.processor is None:
            raise ValueError("this model was loaded without a processor; pass pixel_values instead")
        batch = self.processor.image_processor(images, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in self.input_fields}

    def _inputs(self, input: Any, **kwargs) -> VLMInputs:
        given = {k: v for k, v in kwargs.items() if v is not None}
        if isinstance(input, VLMInputs):
            batch = {**input.as_kwargs(), **given}
        elif isinstance(input, Mapping):
            batch = {**input, **given}
        elif isinstance(input, Tensor):
            batch = {"input_ids": input, **given}
        elif input is None:
            batch = given
        else:
            raise TypeError(f"unsupported input of type {type(input).__name__}; pass model.prepare(images=, text=)")
        unused = sorted(k for k, v in batch.items() if v is not None and k not in self.input_fields)
        if unused:
            raise ValueError(f"HookedCLIP does not use {unused}; refusing to drop them (it takes {sorted(self.input_fields)})")
        if batch.get("input_ids") is None or batch.get("pixel_values") is None:
            raise ValueError(
                "HookedCLIP scores images against texts: pass both input_ids and pixel_values "
                "(model.prepare(images=..., text=...)); for one tower use model.encode_image / model.encode_text"
            )
        return VLMInputs.from_mapping(batch).to(self.device)

    def _check_text(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        _check_token_ids(input_ids, self.vlm_cfg.text.d_vocab, lambda ids: torch.zeros_like(ids, dtype=torch.bool))
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [text, pos], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; build "
                "both with the processor (model.prepare)"
            )

    # ---------------------------------------------------------------- running

    def encode_image(
        self,
        pixel_values: Float[Tensor, "image channel height width"] | Float[Tensor, "image patch pixels"],
        pixel_attention_mask: Int[Tensor, "image patch"] | None = None,
        spatial_shapes: Int[Tensor, "image 2"] | None = None,
    ) -> Float[Tensor, "image d_proj"]:
        """HF's ``get_image_features``: the pooled, projected image embedding (not normalised). SigLIP 2 takes its
        processor's three tensors (``model.encode_image(**model.image_inputs(images))``)."""
        if self.vlm_cfg.naflex:
            mask, shapes = (t.to(self.device) if t is not None else None for t in (pixel_attention_mask, spatial_shapes))
            return self.vision.encode(pixel_values.to(self.device), mask, shapes)
        if pixel_attention_mask is not None or spatial_shapes is not None:
            raise ValueError(
                f"{self.vlm_cfg.architecture}'s vision tower takes whole images of one size; pixel_attention_mask and "
                "spatial_shapes are SigLIP 2's (NaFlex) inputs, refusing to drop them"
            )
        return self.vision.encode(pixel_values.to(self.device))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Float[Tensor, "text d_proj"]:
        """HF's ``get_text_features``: the pooled, projected text embedding (not normalised)."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        self._check_text(input_ids, attention_mask)
        return self.text(input_ids, attention_mask)

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Float[Tensor, "image text"]:
        """``logits_per_image`` from unnormalised embeddings, as HF computes it."""
        if self.vlm_cfg.family == "clip":  # HF's CLIP spells the norm out (for export), SigLIP calls norm: both rounded as HF
            image_embeds = image_embeds / image_embeds.pow(2).sum(-1, keepdim=True).pow(0.5)
            text_embeds = text_embeds / text_embeds.pow(2).sum(-1, keepdim=True).pow(0.5)
        else:
            image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
            text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = (text_embeds @ image_embeds.t()) * self.logit_scale.exp()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return logits_per_text.t()

    def forward(
        self, input: VLMInputs | Mapping | None = None, *, return_type: Literal["logits"] | None = "logits", **hf_inputs
    ) -> Float[Tensor, "image text"] | None:
        """``logits_per_image`` ``[image, text]`` (HF's), from ``model.prepare`` output or HF-style keywords
        (``input_ids=, pixel_values=, attention_mask=``)."""
        inputs = self._inputs(input, **hf_inputs)
        images = self.encode_image(inputs.pixel_values, inputs.pixel_attention_mask, inputs.spatial_shapes)
        logits = self.similarity(images, self.encode_text(inputs.input_ids, inputs.attention_mask))
        return logits if return_type == "logits" else None

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        for tower in self.towers().values():
            tower.cfg.use_attn_result = use_attn_result

    def run_with_cache(self, *model_args, names_filter=None, return_cache_object: bool = True,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, device=None, pos_slice=None, **kwargs):
        """TL's run_with_cache (``hook_result`` left out of a full cache, as TL, unless ``use_attn_result``). A plain
        forward cache stores straight from the hook points (observing never changes the outputs); gradients,
        another device or a position slice go through TL's own hooks."""
        if names_filter is None and not self.vlm_cfg.text.use_attn_result:
            names_filter = _not_result
        if incl_bwd or device is not None or pos_slice is not None:
            out, cache = super().run_with_cache(*model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim,
                                                incl_bwd=incl_bwd, device=device, pos_slice=pos_slice, **kwargs)
        else:
            for hook_cleanup in ("reset_hooks_end", "clear_contexts"):
                kwargs.pop(hook_cleanup, None)
            out, cache = HookedVLM._run_caching(self, model_args, names_filter, kwargs)
            if remove_batch_dim:
                cache = {name: drop_batch_dim(t) for name, t in cache.items()}
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    # ---------------------------------------------------------------- analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes: list[tuple[int, int]] | None) -> list[dict]:
        """The vision tower's positions of every image: the class token (CLIP) then the patches, row-major, with
        pixel boxes in the original image (``original_sizes``) or the processed one (None). SigLIP 2: each image's
        own ``h x w`` grid, then its padded positions (``kind`` "padding", no box)."""
        cfg = self.vlm_cfg.vision
        if self.vlm_cfg.naflex:
            return naflex_cells(inputs.spatial_shapes, inputs.pixel_values.shape[1], cfg.patch_size, original_sizes)
        cells = []
        for image in range(inputs.pixel_values.shape[0]):
            geometry = processed_pixels if original_sizes is None else original_pixels(
                self.processor.image_processor, original_sizes[image])
            cells += grid_cells(cfg, image, image, geometry, cfg.class_token, first_patch=int(cfg.class_token))
        return cells

