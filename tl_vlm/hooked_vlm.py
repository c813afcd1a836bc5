"""HookedVLM: a vision-language model under one HookPoint namespace.

The language tower's modules sit at the top level under HookedTransformer's names (``blocks``,
``ln_final``, ...), so every TransformerLens tool finds them; the other towers are children with
prefixes (``vision.*``, ``projector.*``). ``model.language`` is the same language modules seen as
one tower object.

This class holds what every VLM shares: loading, input checks, caching, generation, tokens. Each
family is a subclass in ``families/`` with a typed config; it builds its towers, lists its weight
rules, computes its image features and positions, and declares its capabilities. The default forward
pass here is the common one: image features replace the image placeholder tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from contextlib import nullcontext
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import remove_batch_dim as drop_batch_dim
from transformers import GenerationConfig

from tl_vlm import weight_processing
from tl_vlm.activation_cache import VLMActivationCache
from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache, TransformerBlock
from tl_vlm.components.attention import Attention
from tl_vlm.components.gated_cross_block import GatedCrossBlock
from tl_vlm.components.mlp import MLP
from tl_vlm.components.kv_cache import check_context
from tl_vlm.components.hooks import nested
from tl_vlm.config import VLMConfig
from tl_vlm.convert.hf_modules import ModuleRule
from tl_vlm.convert.model_loading import (
    cast_keeping_float32, check_complete, in_memory_target, iter_safetensors, optional_processor,
    open_checkpoint, set_tower_placement, sync_tower_placement,
)
from tl_vlm.convert.rules import WeightMap, load_weights, set_parameter
from tl_vlm.inputs import VLMInputs
from tl_vlm.placement import BlockOffload, dispatch, plan_placement, to_device, unit_device
from tl_vlm.beam_search import beam_search
from tl_vlm.cache_store import CacheArena, SlicedCache
from tl_vlm.saes import SAEMethods
from tl_vlm.sampling import decode, resolve_settings
from tl_vlm.tower_view import TowerView
from tl_vlm.towers.stacked import LanguageWeights, StackedWeights

ReturnType = Literal["logits", "loss", "both"] | None


class HookedVLM(SAEMethods, LanguageWeights, StackedWeights, HookedRootModule):
    # The family's short name (``vlm_cfg.family``) and the HF architecture names it converts.
    family: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    # Vision-config model types this family converts within its architectures (empty: any the others do not claim);
    # e.g. LLaVA with a ``pixtral`` tower is its own family.
    vision_model_types: ClassVar[tuple[str, ...]] = ()
    # VLMInputs fields the family consumes; any other non-empty field is an error, never dropped.
    input_fields: ClassVar[frozenset[str]] = frozenset({"input_ids", "pixel_values", "attention_mask"})
    # A regular expression for the parameters conversion computes from HF's rather than viewing them (Gemma's norm
    # scales 1 + w, in float32): the only ones that do not share an in-memory HF model's storage.
    computed_parameters: ClassVar[str | None] = None
    # A processor class (with ``from_pretrained(path)``) to use where HF's needs a package that is not installed.
    fallback_processor: ClassVar[type | None] = None
    # HF module-name prefixes as transformers < 4.52 wrote them (VLM-Lens configs): (today's prefix, older prefix).
    legacy_module_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    vlm_cfg: VLMConfig

    def __init__(self, cfg: VLMConfig, processor=None, generation_config: GenerationConfig | None = None):
        super().__init__()
        self.vlm_cfg = cfg
        self.cfg = cfg.language
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.generation_config = generation_config or GenerationConfig()
        self.name_or_path = ""  # where the weights came from (set by the loaders; verify reloads HF from it)
        self.device_map: dict[str, torch.device] | None = None  # set by ``place``: part -> device
        self.offload: BlockOffload | None = None  # set by ``offload_blocks``
        self._alignment: dict = {}  # placement hooks by part
        self.build()
        self.setup()

    def attach_language(self, language: nn.Module) -> None:
        """Register the language tower's modules at the top level (HookedTransformer's names)."""
        for name, child in language.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "language", language)  # a view of the top-level modules, not a second child

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A module put in a top-level slot (SAELens swapping ``hook_embed`` for an SAE) is also the language
        # tower's: the tower calls its own attribute.
        language = self.__dict__.get("language")
        if language is not None and isinstance(value, nn.Module) and name in language._modules:
            setattr(language, name, value)

    def tower(self, name: str) -> TowerView:
        """One tower as a TransformerLens model (tower-relative hook names; runs the whole VLM)."""
        return TowerView(self, name)

    # ---------------------------------------------------------------- what each family defines

    @classmethod
    def config_from_hf(cls, hf_config) -> VLMConfig:
        """The family's typed config from the checkpoint's HF config."""
        raise NotImplementedError

    @classmethod
    def weight_map(cls, cfg: VLMConfig) -> WeightMap:
        raise NotImplementedError

    @classmethod
    def normalize_key(cls, key: str) -> str:
        """Map any historical checkpoint key layout onto one canonical HF layout."""
        return key

    @classmethod
    def hf_module_rules(cls, cfg: VLMConfig) -> list[ModuleRule]:
        """HF module names (today's in-memory layout) -> the hook point or module holding the same output
        (``convert/hf_modules.py``; ``tl_vlm.hf_names`` resolves them). None declared: HF names are refused as
        unknown names, hook names still select."""
        return []

    @classmethod
    def fp32_parameters(cls, cfg: VLMConfig, dtype: torch.dtype) -> str | None:
        """A regular expression matching (from the start) the parameters HF keeps in float32 when loading in
        ``dtype`` (``_keep_in_fp32_modules``); None when there are none."""
        return None

    @classmethod
    def load_processor(cls, path, trust_remote_code: bool):
        """HF's processor; if it cannot load for a missing optional package (a video processor needs torchvision),
        the family's ``fallback_processor`` (same placeholder expansion, images first), with a warning."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except ImportError as err:
            if cls.fallback_processor is None:
                raise
            reason = str(err).strip().splitlines()[0]
            warnings.warn(f"HF's processor for {cls.__name__} cannot load ({reason}); using tl_vlm's {cls.fallback_processor.__name__}")
            return cls.fallback_processor.from_pretrained(path)

    def build(self) -> None:
        """Create the towers (``attach_language`` for the language model, then ``vision``, ``projector`` ...)."""
        raise NotImplementedError

    @property
    def capabilities(self) -> Capabilities:
        """What this model's image tokens are (positions, patches, queries, tiles, video, encoder-decoder)."""
        return Capabilities()

    def towers(self) -> dict[str, nn.Module]:
        """Every transformer tower of this model by name; each has ``cfg`` and ``blocks``."""
        return {"language": self.language, "vision": self.vision}

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        """Projected image features in the order of the image placeholder tokens."""
        raise NotImplementedError

    def image_token_cells(self, inputs: VLMInputs, original_sizes: list[tuple[int, int]] | None) -> list[dict]:
        """Per image token, in placeholder order: image, tile, patch, row, col, kind and pixel box
        (see analysis/spatial.py)."""
        raise NotImplementedError(f"no spatial index for {type(self).__name__} yet")

    def padded_rows(self, inputs: VLMInputs, hook: str) -> Bool[Tensor, "row pos"] | None:
        """Which positions of a vision or projector hook's rows are real when rows are padded to the largest image
        (``capabilities.padded_vision_rows``), so pooling skips the padding; None when every position is real."""
        return None

    def token_patches(self, cell: Mapping[str, Any]) -> list[int]:
        """The vision patches (in the cell's vision row ``tile``) behind the image token of one ``image_token_cells``
        cell: ``patches_per_token`` consecutive ones from its ``patch`` (a merge block in Qwen-VL's patch order)."""
        return [cell["patch"] + k for k in range(self.capabilities.patches_per_token)]

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """Which language positions hold image features."""
        return input_ids == self.vlm_cfg.image_token_id

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        """The HF modules whose outputs equal each tower's ``blocks.{i}.hook_resid_post`` (for verify)."""
        return {"language": list(hf_model.model.language_model.layers), "vision": list(hf_model.model.vision_tower.encoder.layers)}

    def align_hf_outputs(
        self, tower: str, outputs: list[Tensor], inputs: VLMInputs
    ) -> tuple[list[Tensor], Tensor | None]:
        """HF's per-block outputs of ``tower`` in call order -> one reference per block, and the boolean index
        that picks the same elements from tl_vlm's ``blocks.{i}.hook_resid_post`` (None: all of it)."""
        return outputs, None

    def run_vlm(
        self,
        inputs: VLMInputs,
        position_ids: Tensor | None,
        cache: KVCache | None,
        stop_at_layer: int | None,
        logits_to_keep: int,
        generated_from: int | None,
    ) -> Tensor:
        """The family's forward pass. Default: embed the text, put the image features at the placeholders, run
        the language tower."""
        embeds, _ = self.embed_prompt(inputs, generated_from)
        return self.language(embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep)

    def embed_prompt(
        self, inputs: VLMInputs, generated_from: int | None
    ) -> tuple[Float[Tensor, "batch pos d_model"], Bool[Tensor, "batch pos"]]:
        """The language tower's input embeddings, the image features (checked against the placeholders) at the
        image placeholders, and the placeholder mask."""
        ids = inputs.input_ids
        image_mask = self.image_token_mask(ids)
        if generated_from is not None:  # generated placeholder ids are plain tokens, as in HF's decode steps
            image_mask[:, generated_from:] = False
        features = self.checked_image_features(inputs, image_mask)
        embeds = self.language.embed_inputs(ids, features, image_mask if features is not None else None)
        return embeds, image_mask

    def checked_image_features(self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"]) -> Tensor | None:
        """``image_features`` after checking images and placeholders against each other (never a silent drop)."""
        n_placeholders = int(image_mask.sum())
        token = self.vlm_cfg.image_token_id
        if inputs.pixel_values is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholder tokens (id {token}) but no pixel_values were "
                    "given; pass the processor's pixel_values (model.prepare(images=..., text=...)) or drop the placeholders"
                )
            return None
        if not n_placeholders:
            raise ValueError(
                f"pixel_values were given but input_ids hold no image placeholder token (id {token}), so the image "
                "would be ignored; put the image token in the prompt (model.prepare does this)"
            )
        features = self.image_features(inputs)
        if features.shape[0] != n_placeholders:
            raise ValueError(
                f"the images give {features.shape[0]} feature vectors but input_ids hold {n_placeholders} image "
                "placeholder tokens; build prompt and images together with the model's processor (model.prepare)"
            )
        return features

    def scoring_inputs(self, inputs: VLMInputs) -> VLMInputs:
        """What one forward pass over a prompt needs (extraction, verify): the prompt itself, here."""
        return inputs

    def prefill_positions(self, inputs: VLMInputs, mask: Tensor) -> Tensor:
        """Prompt positions as HF's generate computes them: left padding does not shift them."""
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def new_kv_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> KVCache:
        """An empty KV cache for generation (a family whose layers cache more than keys and values overrides it);
        ``device``: one, or one per language block."""
        return KVCache(self.cfg, batch, max_len, device, dtype)

    def next_positions(self, positions: Tensor) -> Tensor:
        """Positions of the next generated token (last axis is the sequence)."""
        return positions[..., -1:] + 1

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
        load_processor: bool = True,
        device_map: str | dict | None = None,
        n_devices: int | None = None,
        max_memory: dict | None = None,
        offload_blocks: bool = False,
    ) -> "HookedVLM":
        """Load a HF checkpoint (local directory or hub id) straight from its safetensors files. ``dtype``: a torch
        dtype, its name ("bfloat16", "fp16", ...) or "auto" (the checkpoint's ``dtype``). ``device_map`` ("auto" or
        part -> device), ``n_devices`` or ``max_memory`` split the model over devices (``placement.plan_placement``);
        each weight loads straight onto its device. ``offload_blocks``: the language blocks stay in CPU memory and
        are streamed to ``device`` one at a time (``placement.BlockOffload``)."""
        path, hf_config, dtype = open_checkpoint(model_name, revision, trust_remote_code, dtype)
        family = cls._family(hf_config, hf_config.architectures)
        processor = optional_processor(family, path, trust_remote_code) if load_processor else None
        generation_config = (
            GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists() else None
        )
        placement = _placement_request(device, device_map, n_devices, max_memory, offload_blocks)
        model = family._convert(
            hf_config, iter_safetensors(path), device, dtype, processor, generation_config, placement=placement
        )
        if offload_blocks:
            model.offload_blocks(device)
        model.name_or_path = str(model_name)
        model.process_weights(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
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
        center_unembed: bool = False,
        fold_value_biases: bool = False,
    ) -> "HookedVLM":
        """Convert an in-memory HF model. Weights are shared with it, not copied, where device and dtype
        agree; weight processing writes new tensors, so it never edits the HF model. Without ``dtype`` each weight
        keeps the HF model's dtype (what it loaded in float32 stays so, what it was cast to stays cast); with one,
        weights are converted as ``from_pretrained`` would load them in that dtype."""
        family = cls._family(hf_model.config, [type(hf_model).__name__])
        state = hf_model.state_dict()
        # Rotary frequencies are buffers outside the state dict; a HF model cast with .to(dtype) uses them rounded.
        # Gemma 3 keeps one table per layer type (full_attention_inv_freq, sliding_attention_inv_freq).
        frequencies = [(name, b) for name, b in hf_model.named_buffers()
                       if name.endswith((".inv_freq", "_attention_inv_freq")) and name not in state]
        device, dtype, keep_float32 = in_memory_target(hf_model, device, dtype)
        model = family._convert(
            hf_model.config,
            itertools.chain(state.items(), frequencies),
            device,
            dtype,
            processor,
            getattr(hf_model, "generation_config", None),
            keep_float32=keep_float32,
        )
        model.name_or_path = getattr(hf_model, "name_or_path", "") or ""
        model.process_weights(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
        return model

    @classmethod
    def _family(cls, hf_config, architectures) -> "type[HookedVLM]":
        """The family class for a checkpoint; called on a family class, the checkpoint must be of that family."""
        from tl_vlm.families import family_for

        family = family_for(hf_config, architectures)
        if not issubclass(family, cls):
            raise ValueError(f"the checkpoint is a {family.__name__} model, not a {cls.__name__}; load it with HookedVLM")
        return family

    @classmethod
    def _convert(
        cls, hf_config, tensors, device, dtype, processor, generation_config, keep_float32: bool = False,
        placement: dict | None = None,
    ) -> "HookedVLM":
        """``keep_float32``: float32 tensors stay float32 (an in-memory model's own per-weight dtypes); else the
        family's ``fp32_parameters`` say which weights HF keeps in float32 when loading in ``dtype``. ``placement``:
        ``plan_placement``'s arguments, planned on the built model before any weight loads."""
        cfg = cls.config_from_hf(hf_config)
        set_tower_placement(cfg, device, dtype)
        # Parameters start as torch.empty (pages untouched until written) and are replaced by views of
        # the checkpoint's tensors, so the process never holds two copies of the weights.
        model = cls(cfg, processor, generation_config or GenerationConfig.from_model_config(hf_config))
        plan = plan_placement(model, dtype=dtype, **placement) if placement is not None else None
        if plan is not None:
            device = unit_device(plan)
        fp32 = None if keep_float32 else cls.fp32_parameters(cfg, dtype)
        loaded = load_weights(model, cls.weight_map(cfg), tensors, cls.normalize_key, device, dtype, fp32, keep_float32)
        if "unembed.W_U" not in loaded and cfg.language.tie_word_embeddings:
            set_parameter(model, "unembed.W_U", model.embed.W_E.T)
            loaded.add("unembed.W_U")
        check_complete(model, loaded)
        # A placed model's weights are already on their devices.
        model = cast_keeping_float32(model, dtype, None if plan is not None else device)
        if plan is not None:
            model.place(plan)
        return model.eval()

    def place(self, plan: dict[str, torch.device]) -> None:
        """Put each part on its planned device (``placement.plan_placement``) and move activations between them;
        ``device_map`` records the plan."""
        if self.device_map is not None:
            raise ValueError("this model is already placed over devices; load it again to place it differently")
        self._alignment = dispatch(self, plan)
        self.device_map = dict(plan)
        for tower in self.towers().values():
            tower.cfg.device = str(next(tower.parameters()).device)

    def offload_blocks(self, device: str | torch.device) -> None:
        """Keep the language blocks' weights in CPU memory and stream them to ``device`` as each block runs; the
        other parts must already be on ``device`` (``from_pretrained(..., device=, offload_blocks=True)`` does it)."""
        for i in range(len(self.blocks)):  # blocks compute on ``device``: activations stay there
            if f"blocks.{i}" in self._alignment:
                self._alignment.pop(f"blocks.{i}").remove()
        self.offload = BlockOffload(self.blocks, device)
        self.device_map = {**(self.device_map or {}), **{f"blocks.{i}": self.offload.device for i in range(len(self.blocks))}}

    def block_devices(self) -> list[torch.device]:
        """The device each language block computes on (where its KV cache lives)."""
        if self.offload is not None:
            return [self.offload.device] * len(self.blocks)
        return [next(block.parameters()).device for block in self.blocks]

    def process_weights(
        self,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
    ) -> None:
        """TL weight processing; outputs (softmax of the logits) are unchanged. See weight_processing."""
        weight_processing.process(self, fold_ln, center_writing_weights, center_unembed, fold_value_biases)
        self.setup()

    # ---------------------------------------------------------------- properties

    def _apply(self, fn, recurse: bool = True):
        """``.to`` / ``.half()`` / ``.cuda()``: each tower's ``cfg.dtype`` / ``cfg.device`` follow its weights."""
        super()._apply(fn, recurse)
        if "language" in self.__dict__:
            sync_tower_placement(self.towers().values())
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    # ---------------------------------------------------------------- inputs

    def prepare(self, images=None, text: str | list[str] | None = None, **processor_kwargs) -> VLMInputs:
        """Run the model's HF processor; returns inputs with the images attached."""
        if self.processor is None:
            raise ValueError("this model was loaded without a processor; pass HF processor outputs to the model instead")
        if text is None:
            raise ValueError("prepare needs text (with the model's image placeholder where each image goes)")
        if isinstance(text, list) and len(text) > 1:
            processor_kwargs.setdefault("padding", True)
        batch = self.process(images=images, text=text, return_tensors="pt", **processor_kwargs)
        texts = text if isinstance(text, list) else [text]
        # Q-Former families take one image per prompt; their processors insert the placeholders themselves.
        image_token = None if self.capabilities.queries else self.processor.image_token
        layout = {"row_images": _placeholders_per_row(image_token, texts, images),
                  "row_videos": _placeholders_per_row(getattr(self.processor, "video_token", None), texts,
                                                      processor_kwargs.get("videos"))}
        return dataclasses.replace(self._own_fields(VLMInputs.from_mapping(batch)), **layout).to(self.device)

    def _inputs(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None, **kwargs) -> VLMInputs:
        """Whatever a caller passes as the model's input, as VLMInputs. Text is text only, as TL tokenizes it
        (image placeholders in it then raise at the run: a prompt with images goes through ``model.prepare``)."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if input is None:
            batch = given
        elif isinstance(input, VLMInputs):
            batch = {**input.as_kwargs(), **given}
        elif isinstance(input, Mapping):
            batch = {**input, **given}
        elif isinstance(input, Tensor):
            batch = {"input_ids": input, **given}
        else:
            raise TypeError(f"unsupported input of type {type(input).__name__}")
        if "input_ids" not in batch:
            raise ValueError("input_ids are required")
        inputs = self._own_fields(VLMInputs.from_mapping(batch))
        unused = sorted(set(inputs.as_kwargs()) - self.input_fields)
        if unused:
            raise ValueError(
                f"{self.vlm_cfg.architecture} does not use {unused}; refusing to drop them silently "
                f"(it takes {sorted(self.input_fields)})"
            )
        inputs = inputs.unsqueezed()
        _check_token_ids(inputs.input_ids, self.cfg.d_vocab, self.image_token_mask)
        return inputs

    def process(self, **kwargs) -> Mapping:
        """The processor's output for ``prepare`` (a family drops what it derives from the rest: PaliGemma's labels)."""
        return self.processor(**kwargs)

    def unscored_positions(self, inputs: VLMInputs) -> Bool[Tensor, "batch pos"]:
        """Positions whose token the loss does not score as a target: image placeholders (PaliGemma: its prefix)."""
        return self.image_token_mask(inputs.input_ids)

    def _own_fields(self, inputs: VLMInputs) -> VLMInputs:
        """Tokenizers return ``token_type_ids`` for models that do not read them (all zeros there): dropped for those."""
        if "token_type_ids" in self.input_fields or inputs.token_type_ids is None:
            return inputs
        return dataclasses.replace(inputs, token_type_ids=None)

    def prompt_offset(self) -> int:
        """Positions a family puts before ``input_ids`` (legacy BLIP-2's queries), which the attention mask of a
        cached decode step need not cover."""
        return 0

    def check_masks(self, inputs: VLMInputs, past: int) -> None:
        """Each mask must match its token ids: a mask of the wrong shape that is all ones would otherwise be
        ignored, and a padded one would mask the wrong positions. ``past``: positions already in the KV cache."""
        batch, pos = inputs.input_ids.shape
        widths = {past + pos} | ({past + pos - self.prompt_offset()} if past else set())
        pairs = (("attention_mask", "input_ids", widths), ("qformer_attention_mask", "qformer_input_ids", None),
                 ("decoder_attention_mask", "decoder_input_ids", None))
        for mask_name, ids_name, allowed in pairs:
            mask, ids = getattr(inputs, mask_name), getattr(inputs, ids_name)
            if mask is None or ids is None:
                continue
            allowed = allowed or {ids.shape[-1]}
            if mask.ndim != 2 or mask.shape[0] != ids.shape[0] or mask.shape[1] not in allowed:
                expected = " or ".join(f"({ids.shape[0]}, {w})" for w in sorted(allowed))
                raise ValueError(
                    f"{mask_name} has shape {tuple(mask.shape)} but {ids_name} {tuple(ids.shape)} needs {expected}"
                    f"{f' (with {past} cached positions)' if past else ''}; build both with the processor "
                    "(model.prepare)"
                )

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        input: VLMInputs | Tensor | Mapping | None = None,
        *,
        position_ids: Tensor | None = None,
        return_type: ReturnType = "logits",
        stop_at_layer: int | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        generated_from: int | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **hf_inputs: Tensor,
    ):
        """Logits (or loss) of the language model on text with images merged in.

        Inputs come as a ``VLMInputs``, a mapping (e.g. the HF processor's output), token ids, and/or
        HF-style keywords (``input_ids=, pixel_values=, attention_mask=, image_sizes=, image_grid_thw=``...).
        Text runs text only, tokenized as ``to_tokens`` does (``prepend_bos=``, ``padding_side=``).

        ``generated_from``: positions from here on are generated text, where an image placeholder id is a
        plain token (as in HF's decode steps). A non-empty ``cache`` already holds the images, so all its
        new positions are generated text.
        """
        inputs = self._inputs(input, prepend_bos, padding_side, **hf_inputs).to(self.device)
        self.check_masks(inputs, cache.length if cache is not None else 0)
        if cache is not None and cache.length > 0:
            generated_from = 0
        out = self.run_vlm(inputs, position_ids, cache, stop_at_layer, logits_to_keep, generated_from)
        if self.device_map is not None:  # split over devices: the output comes back to the inputs' device
            out = to_device(out, self.device)
        if stop_at_layer is not None or return_type == "logits":
            return out
        if return_type is None:
            return None
        loss = _next_token_loss(out, inputs.input_ids, inputs.attention_mask, self.unscored_positions(inputs))
        return loss if return_type == "loss" else (out, loss)

    def _run_caching(self, model_args, names_filter, kwargs, cache: dict | None = None) -> tuple[Any, dict[str, Tensor]]:
        cache = {} if cache is None else cache  # a SlicedCache slices / moves what it stores
        direct, inner_names = _caching_plan(self, names_filter)
        inner = [(name, partial(_store, cache)) for name in inner_names]
        # Plain attributes, set in __dict__: nn.Module.__setattr__ costs more than the rest of a tiny forward's caching.
        previous = [hook.__dict__.get("cache_into") for hook in direct]
        for hook in direct:
            hook.__dict__["cache_into"] = cache
        try:
            with self.hooks(fwd_hooks=inner) if inner else nullcontext():
                out = self(*model_args, **kwargs)
        finally:
            for hook, before in zip(direct, previous):
                hook.__dict__["cache_into"] = before
        return out, cache

    def release_reused_memory(self) -> None:
        """Free the memory that ``run_with_cache`` keeps from run to run for its largest activations (up to twice
        their size, on the CPU; components/reused_storage.py). The next cache allocates it again."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP, TransformerBlock)):
                module.reused.release()

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """As in TL: whether caching everything includes the per-head ``hook_result`` of every tower."""
        for tower in self.towers().values():
            tower.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool, tower: str = "language") -> None:
        """TL's per-head Q/K/V inputs (``blocks.{i}.attn.hook_q_input|k_input|v_input``, before ``ln1``) in one
        tower (tower views pass theirs); edge attribution and direct path patching turn them on."""
        for block in self._pre_norm_blocks(tower, "use_split_qkv_input"):
            block.attn.split_inputs(use_split_qkv_input)
        self.towers()[tower].cfg.use_split_qkv_input = use_split_qkv_input
        self.setup()

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool, tower: str = "language") -> None:
        """TL's ``blocks.{i}.hook_mlp_in`` (the stream the MLP reads, before ``ln2``) in one tower."""
        for block in self._pre_norm_blocks(tower, "use_hook_mlp_in"):
            block.mlp_input_hook(use_hook_mlp_in)
        self.towers()[tower].cfg.use_hook_mlp_in = use_hook_mlp_in
        self.setup()

    def _pre_norm_blocks(self, tower: str, flag: str) -> list[TransformerBlock]:
        towers = self.towers()
        blocks = list(towers[tower].blocks) if tower in towers else []
        if not blocks or not all(isinstance(b, TransformerBlock) for b in blocks):
            raise NotImplementedError(
                f"{flag} needs a tower of pre-norm transformer blocks; {type(self).__name__}'s {tower!r} has none "
                f"(its towers: {', '.join(towers)})"
            )
        return blocks

    def run_with_cache(
        self,
        *model_args,
        names_filter=None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        device=None,
        pos_slice=None,
        arena: CacheArena | None = None,
        **kwargs,
    ):
        """TL's run_with_cache returning an ActivationCache. As in HookedTransformer, caching everything
        leaves out ``hook_result`` (it is ``head`` times the residual stream) unless ``use_attn_result`` is
        set; name it in ``names_filter`` to get it anyway.

        Forward caching stores activations straight from the hook points (components/hooks.py), sliced and
        moved as they are stored for ``pos_slice`` / ``device`` (cache_store.py); gradients go through TL's own
        caching hooks. ``arena``: a ``tl_vlm.CacheArena`` whose buffers hold the activations, reused by the next
        run with it (which overwrites this cache's tensors; opt-in, see cache_store.py)."""
        if names_filter is None and not self.cfg.use_attn_result:
            names_filter = _not_result
        if incl_bwd and arena is not None:
            raise ValueError("arena= holds forward activations only; drop it to cache gradients (incl_bwd=True)")
        if not incl_bwd and (device is not None or pos_slice is not None or arena is not None):
            for hook_cleanup in ("reset_hooks_end", "clear_contexts"):  # no hooks are registered on this path
                kwargs.pop(hook_cleanup, None)
            store = SlicedCache(device, pos_slice, remove_batch_dim, arena)
            out, _ = self._run_caching(model_args, names_filter, kwargs, store)
            cache = store.finish()
        elif incl_bwd:
            out, cache = super().run_with_cache(
                *model_args, names_filter=names_filter, remove_batch_dim=remove_batch_dim, incl_bwd=incl_bwd,
                device=device, pos_slice=pos_slice, **kwargs,
            )
        else:
            for hook_cleanup in ("reset_hooks_end", "clear_contexts"):  # no hooks are registered on this path
                kwargs.pop(hook_cleanup, None)
            out, cache = self._run_caching(model_args, names_filter, kwargs)
            if remove_batch_dim:
                cache = {name: drop_batch_dim(t) for name, t in cache.items()}
        if return_cache_object:
            cache = VLMActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        input: VLMInputs | Tensor | Mapping | None = None,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int | None = None,
        use_past_kv_cache: bool = True,
        generator: torch.Generator | None = None,
        **input_kwargs,
    ) -> Int[Tensor, "batch pos"]:
        """Prompt followed by the new tokens, as HF's ``generate`` returns them (with ``num_return_sequences``,
        that many rows per prompt, best beam first).

        Unset settings come from ``model.generation_config`` (the checkpoint's), then HF's defaults, so
        greedy tokens and greedy beams equal HF's and seeded sampling draws from HF's distribution. Hooks fire at
        every step, in every beam; the prompt pass runs once per row and its KV cache is copied to the row's beams
        (HF runs it once per beam, on identical rows). Beam search needs the KV cache, which follows the beams.
        """
        inputs = self._inputs(input, **input_kwargs)
        if inputs.pixel_values is None and isinstance(input, str):  # TL: text in, text out
            return self.to_string(self.generate(inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                temperature=temperature, top_k=top_k, top_p=top_p,
                                                repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                                use_past_kv_cache=use_past_kv_cache, generator=generator)[0])
        settings = resolve_settings(
            self.generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return_sequences,
        )
        if settings.num_beams > 1 and not use_past_kv_cache:
            raise NotImplementedError(
                "beam search without the KV cache (it would rerun every beam's images); use use_past_kv_cache=True"
            )
        return self.generate_tokens(inputs.to(self.device), settings, use_past_kv_cache, generator)

    def generate_tokens(
        self, inputs: VLMInputs, settings: GenerationConfig, use_past_kv_cache: bool, generator: torch.Generator | None
    ) -> Int[Tensor, "batch pos"]:
        """Decoder-only generation: prefill the prompt (with its images), then one token per step."""
        ids = inputs.input_ids
        batch, prompt_len = ids.shape
        n_new = settings.max_new_tokens if settings.max_new_tokens is not None else max(settings.max_length - prompt_len, 1)
        prompt_mask = inputs.attention_mask if inputs.attention_mask is not None else torch.ones_like(ids)
        mask, positions = prompt_mask, self.prefill_positions(inputs, prompt_mask)
        # Sized by the positions, which count any positions a family adds to the prompt (BLIP-2's legacy queries).
        n_cached = positions.shape[-1] + n_new
        check_context(self.cfg, n_cached)
        cache = self.new_kv_cache(batch, n_cached, self.block_devices(), self.embed.W_E.dtype) if use_past_kv_cache else None
        # Only the last position's logits are needed (HF's logits_to_keep=1): skips the prompt's unembedding.
        logits = self(inputs, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)

        def step(token: Tensor, ids: Tensor) -> Tensor:
            nonlocal mask, positions
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = torch.cat([positions, self.next_positions(positions)], dim=-1)
            if cache is not None:
                return self(input_ids=token[:, None], attention_mask=mask, position_ids=positions[..., -1:], cache=cache,
                            logits_to_keep=1)
            again = dataclasses.replace(inputs, input_ids=ids, attention_mask=mask)
            return self(again, position_ids=positions, logits_to_keep=1, generated_from=prompt_len)

        if settings.num_beams > 1:

            def select(rows: Tensor) -> None:
                nonlocal mask, positions
                cache.select_rows(rows)
                mask, positions = mask[rows], positions[..., rows, :]  # positions: [batch, pos] or M-RoPE's [3, batch, pos]

            return beam_search(logits, ids, n_new, settings, prompt_mask, step, select)
        return decode(logits, ids, n_new, settings, prompt_mask, generator, step)

    # ---------------------------------------------------------------- TransformerLens model surface

    def tokens_to_residual_directions(self, tokens: str | int | Tensor | list[int]) -> Tensor:
        """Unembedding directions of tokens (a string must be one token)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return super().tokens_to_residual_directions(tokens)

    def tl_parameters(self) -> dict[str, Tensor]:
        """Parameters under TL names, with grouped K/V repeated per head (what SVDInterpreter reads)."""
        params = dict(self.named_parameters())
        for name, tower in self.towers().items():
            prefix = "" if name == "language" else f"{name}."
            for i, block in enumerate(tower.blocks):
                if isinstance(block, GatedCrossBlock):  # no self-attention (Mllama)
                    continue
                params[f"{prefix}blocks.{i}.attn.W_K"] = block.attn.W_K
                params[f"{prefix}blocks.{i}.attn.W_V"] = block.attn.W_V
                # What writes into the stream: InternViT's is its weight times the layer scale (a property)
                params[f"{prefix}blocks.{i}.attn.W_O"] = block.attn.W_O
        return params

    # ---------------------------------------------------------------- tokens

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None) -> Tensor:
        """Text-only token ids. Prompts with images go through ``model.prepare(images=, text=)``."""
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        batch = self.tokenizer(
            text if isinstance(text, list) else [text], return_tensors="pt", padding=True,
            add_special_tokens=prepend_bos, **({"padding_side": padding_side} if padding_side else {}),
        )
        return batch.input_ids.to(self.device)

    def to_string(self, tokens: Tensor | int) -> str | list[str]:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim <= 1:
            return self.tokenizer.decode(tokens.reshape(-1))
        return self.tokenizer.batch_decode(tokens)

    def to_str_tokens(
        self, tokens: Tensor | VLMInputs | str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None
    ) -> list[str] | list[list[str]]:
        if isinstance(tokens, VLMInputs):
            tokens = tokens.input_ids
        if isinstance(tokens, list):
            return [self.to_str_tokens(text, prepend_bos, padding_side) for text in tokens]
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens, prepend_bos, padding_side)[0]
        if tokens.ndim > 1:
            return [self.to_str_tokens(row) for row in tokens]
        return self.tokenizer.convert_ids_to_tokens(tokens.reshape(-1).tolist())

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Tensor | VLMInputs,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """TL's: where ``single_token`` first (or last) occurs in one prompt."""
        tokens = self._inputs(input, prepend_bos, padding_side).input_ids
        if tokens.shape[0] != 1:
            raise ValueError(f"get_token_position takes one prompt, got a batch of {tokens.shape[0]}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (tokens[0] == token).nonzero()[:, 0]
        if not len(where):
            raise ValueError(f"token {single_token!r} does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])

    def to_single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens, not one")
        return ids[0]


def _placement_request(device, device_map, n_devices: int | None, max_memory: dict | None, offload: bool) -> dict | None:
    """``plan_placement``'s arguments; offloading places every part but the blocks on ``device`` (the blocks on CPU)."""
    if offload:
        if device is None or device_map is not None or n_devices is not None:
            raise ValueError("offload_blocks=True streams the blocks to one device: pass device= (e.g. 'cuda'), "
                             "without device_map= or n_devices=")
        return {"device_map": {"": device, "blocks": "cpu"}, "n_devices": None, "max_memory": None}
    if device_map is None and n_devices is None and max_memory is None:
        return None
    if device is not None:
        raise ValueError("pass either device= (the whole model on one device) or device_map= / n_devices= / max_memory=")
    return {"device_map": "auto" if device_map is None and n_devices is None else device_map,
            "n_devices": n_devices, "max_memory": max_memory}


def _check_token_ids(ids: Tensor, d_vocab: int, image_token_mask: Callable[[Tensor], Tensor]) -> None:
    """Integer ids inside the vocabulary (image placeholders aside: they are replaced by features, never
    embedded), so a bad id is a clear error rather than an IndexError deep inside the embedding."""
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}; build them with model.prepare or the tokenizer")
    if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
        raise ValueError(f"input_ids must be [batch, pos] (or [pos]) with at least one token, got shape {tuple(ids.shape)}")
    # Every forward and decode step runs this: one fused reduction and one host sync.
    text = ids.masked_fill(image_token_mask(ids.reshape(-1, ids.shape[-1])).reshape(ids.shape), 0)
    low, high = (int(v) for v in torch.aminmax(text))
    if low < 0 or high >= d_vocab:
        raise ValueError(
            f"input_ids hold ids outside the vocabulary [0, {d_vocab}) (min {low}, max {high}); "
            "tokenize with this model's tokenizer"
        )


def _caching_plan(model: nn.Module, names_filter) -> tuple[list[HookPoint], list[str]]:
    """The hook points a cache stores from directly, and the chosen names inside a swapped-in module (an SAE's own
    hooks, called by it, not by run_hook), for TL's names_filter forms (None, a name, a list of names, a predicate).
    Names are looked up, not scanned for; the plan for everything (and everything but hook_result) is kept until
    ``setup()`` builds a new ``hook_dict``: per run, no Python work for hook points a cache does not touch."""
    hook_dict = model.hook_dict
    plans = model.__dict__.setdefault("_caching_plans", {}) if names_filter is None or names_filter is _not_result else None
    if plans is not None and names_filter in plans and plans[names_filter][0] is hook_dict:
        return plans[names_filter][1:]
    if isinstance(names_filter, str) or not (names_filter is None or callable(names_filter)):
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        chosen = [name for name in dict.fromkeys(names) if name in hook_dict]
    else:
        chosen = [name for name in hook_dict if names_filter is None or names_filter(name)]
    plan = [hook_dict[name] for name in chosen if not nested(name)], [name for name in chosen if nested(name)]
    if plans is not None:
        plans[names_filter] = (hook_dict, *plan)
    return plan


def _placeholders_per_row(token, texts: list[str], media) -> tuple[int, ...]:
    """Images (videos) of each prompt, counted from its placeholders before the processor expands them; without a
    placeholder token, one per prompt."""
    if media is None:
        return (0,) * len(texts)
    if token is None:
        return (1,) * len(texts)
    return tuple(t.count(str(token)) for t in texts)


def _store(cache: dict[str, Tensor], x: Tensor, hook) -> None:
    cache[hook.name] = x.detach()


def _not_result(name: str) -> bool:
    return not name.endswith("hook_result")


def _next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], ids: Tensor, mask: Tensor | None, image_mask: Tensor
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over real text targets (not image placeholders, not padding)."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    target_log_probs = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    valid = ~image_mask[:, 1:]
    if mask is not None:
        valid &= mask[:, 1:].bool()  # as HF with pad labels set to -100, and TL's lm_cross_entropy_loss
    return -(target_log_probs * valid).sum() / valid.sum().clamp(min=1)

