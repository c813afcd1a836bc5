"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution ViT -> PatchMerger -> Qwen2 language model with M-RoPE.

Images and videos are cut into patches by the processor (``pixel_values`` rows, ``image_grid_thw``), run
through one vision tower call (layout in ``towers/qwen_vision.py``: one row per image, then per video),
merged 2x2 into language tokens by the projector and scattered at the ``<|image_pad|>`` /
``<|video_pad|>`` placeholders. Language positions are 3D (temporal, height, width) as computed by HF's
``get_rope_index`` (hf_compat); generation continues them as HF's ``generate`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import KVCache
from tl_vlm.components.axial_rotary import AxialRotary
from tl_vlm.components.mrope import MultimodalRotary
from tl_vlm.config import TowerConfig, VLMConfig
from tl_vlm.convert.hf_modules import ModuleRule, decoder_lm_modules, qwen_vit_modules
from tl_vlm.convert.rules import WeightMap, linear_rules, norm_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.convert.vits import qwen_vit_config, qwen_vit_rules
from tl_vlm.families.qwen_processor import QwenImageTextProcessor
from tl_vlm.hf_compat import qwen_rope_index
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM
from tl_vlm.towers.patch_merger import PatchMerger
from tl_vlm.towers.qwen_vision import PatchGeometry, QwenVisionTower


@dataclass
class QwenVLConfig(VLMConfig):
    video_token_id: int
    geometry: PatchGeometry
    projector_width: int  # the language model's width, which the merger projects to


def qwen_language_config(hf_config) -> TowerConfig:
    """The Qwen2 LM of a Qwen-VL checkpoint: GQA, q/k/v biases, RMSNorm, gated SiLU MLP, M-RoPE."""
    tc = hf_config.text_config
    return decoder_lm_config(
        tc,
        getattr(hf_config, "_name_or_path", ""),
        attn_biases=("q", "k", "v"),
        head_dim=tc.hidden_size // tc.num_attention_heads,  # HF's Qwen2-VL attention ignores config.head_dim
        tie=bool(hf_config.tie_word_embeddings),
    )


def placeholder_runs(mask: Bool[Tensor, "batch pos"]) -> list[int]:
    """Lengths of the runs of consecutive placeholders, batch row by batch row."""
    flat = torch.nn.functional.pad(mask.int(), (1, 1)).flatten()  # a zero between rows ends every run
    edges = torch.diff(flat)
    return ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()


def interleave(
    features: Float[Tensor, "tokens d"], image_mask: Bool[Tensor, "batch pos"], video_mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "tokens d"]:
    """Features of the images, then of the videos (one vision run's order), put in the order of their placeholders."""
    is_image = image_mask[image_mask | video_mask].to(features.device)
    n_image = int(is_image.sum())
    merged = features.new_empty(is_image.shape[0], features.shape[-1])
    merged[is_image], merged[~is_image] = features[:n_image], features[n_image:]
    return merged


class HookedQwen2VL(HookedVLM):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    input_fields = frozenset(
        {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
         "mm_token_type_ids"}
    )
    hf_class = Qwen2VLModel  # whose get_rope_index gives the 3D positions
    fallback_processor = QwenImageTextProcessor  # HF's needs torchvision (for videos)
    vlm_cfg: QwenVLConfig

    # ------------------------------------------------------------------ conversion

    @classmethod
    def geometry(cls, vc) -> PatchGeometry:
        return PatchGeometry(vc.patch_size, vc.temporal_patch_size, vc.in_channels, vc.spatial_merge_size)

    @classmethod
    def projector_width(cls, vc) -> int:
        return vc.hidden_size

    @classmethod
    def config_from_hf(cls, hf_config) -> QwenVLConfig:
        vc = hf_config.vision_config
        return QwenVLConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=qwen_language_config(hf_config),
            vision=qwen_vit_config(vc),
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
            video_token_id=hf_config.video_token_id,
            geometry=cls.geometry(vc),
            projector_width=cls.projector_width(vc),
        )

    @classmethod
    def normalize_key(cls, key: str) -> str:
        # One layout: visual.*, language_model.*, lm_head.*. In memory (transformers 5) both towers sit under
        # model.*; saved files and older hub checkpoints have visual.* and the LM as model.*.
        key = re.sub(r"^model\.(?=visual\.|language_model\.)", "", key)
        return re.sub(r"^model\.", "language_model.", key)

    legacy_module_prefixes = (("model.language_model", "model"), ("model.visual", "visual"))

    @classmethod
    def hf_module_rules(cls, cfg: QwenVLConfig) -> list[ModuleRule]:
        return [
            *qwen_vit_modules("model.visual", "vision"),
            *decoder_lm_modules("model.language_model"),
            ModuleRule("lm_head", "unembed"),
        ]

    @classmethod
    def weight_map(cls, cfg: QwenVLConfig) -> WeightMap:
        return WeightMap(
            [
                *qwen_vit_rules(r"visual", "vision", cfg.vision),
                *norm_rules(r"visual\.merger\.ln_q", "projector.ln"),
                *linear_rules(r"visual\.merger\.mlp\.0", "projector.mlp.W_in", "projector.mlp.b_in"),
                *linear_rules(r"visual\.merger\.mlp\.2", "projector.mlp.W_out", "projector.mlp.b_out"),
                *decoder_lm_rules(r"language_model", cfg.language),
            ]
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(patches_per_token=self.vlm_cfg.geometry.merge_size**2, video=True, padded_vision_rows=True)

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(DecoderLM(cfg.language, MultimodalRotary.from_hf_config(cfg.language.hf_config)))
        rotary = AxialRotary.from_hf_config(cfg.hf_config.vision_config, cfg.vision.d_head)
        self.vision = QwenVisionTower(cfg.vision, cfg.geometry, rotary)
        self.projector = PatchMerger(
            cfg.vision.d_model, cfg.projector_width, cfg.geometry.merge_size, cfg.vision.normalization_type
        )

    def hf_layers(self, hf_model) -> dict[str, list[nn.Module]]:
        return {"language": list(hf_model.model.language_model.layers), "vision": list(hf_model.model.visual.blocks)}

    def align_hf_outputs(self, tower, outputs, inputs):
        """HF runs the vision blocks once for the images, then once for the videos, each on one packed sequence
        (Qwen2.5-VL: in window order); tl_vlm has one padded row per image, then per video, in natural order."""
        if tower != "vision":
            return outputs, None
        grids = [g for g in (inputs.image_grid_thw, inputs.video_grid_thw) if g is not None]
        depth = self.vision.cfg.n_layers
        blocks = [torch.cat([self._natural_order(outputs[r * depth + i], grid) for r, grid in enumerate(grids)])
                  for i in range(depth)]
        return blocks, self.vision.patch_layout(torch.cat(grids)).valid

    def _natural_order(self, packed: Tensor, grid: Tensor) -> Tensor:
        """One run's packed patches from HF's window order back to the processor's order (the layout's windows)."""
        layout = self.vision.patch_layout(grid)
        if layout.window_parts is None:
            return packed
        offsets = [0, *torch.tensor(layout.lengths).cumsum(0).tolist()]
        order = torch.cat([idx + offsets[row] for row, idx in layout.window_parts])
        natural = torch.empty_like(packed)
        natural[order] = packed
        return natural

    def padded_rows(self, inputs: VLMInputs, hook: str) -> Bool[Tensor, "row pos"] | None:
        """Real patches of each image, then video row; the merger's rows from its MLP on are merged tokens."""
        grids = [g for g in (inputs.image_grid_thw, inputs.video_grid_thw) if g is not None]
        if not grids:
            return None
        valid = self.vision.patch_layout(torch.cat(grids)).valid
        patch_rows = hook.startswith(("vision.", "projector.hook_in", "projector.ln."))
        return valid if patch_rows else valid[:, :: self.vlm_cfg.geometry.merge_size**2]

    # ------------------------------------------------------------------ running

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """Positions holding visual features: image and video placeholders."""
        cfg = self.vlm_cfg
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        return self._encode(inputs.pixel_values, inputs.image_grid_thw)

    def _encode(self, pixel_values: Tensor, grid_thw: Tensor) -> Float[Tensor, "tokens d_model"]:
        """One vision + projector run over all visual inputs; tokens in row order, padding dropped."""
        hidden, patches = self.vision(pixel_values, grid_thw)
        merged = self.projector(hidden)
        return merged[patches.valid[:, :: self.vlm_cfg.geometry.merge_size**2]]

    def run_vlm(self, inputs: VLMInputs, position_ids: Tensor | None, cache: KVCache | None, stop_at_layer: int | None,
                logits_to_keep: int, generated_from: int | None) -> Tensor:
        ids = inputs.input_ids
        image_mask, video_mask = self.placeholder_masks(ids, generated_from)
        visual = image_mask | video_mask
        features = self._visual_features(inputs, image_mask, video_mask)
        embeds = self.language.embed_inputs(ids, features, visual if features is not None else None)
        position_ids = self.prompt_positions(inputs, position_ids, cache)
        return self.language(embeds, inputs.attention_mask, position_ids, cache, stop_at_layer, logits_to_keep)

    def placeholder_masks(
        self, ids: Int[Tensor, "batch pos"], generated_from: int | None
    ) -> tuple[Bool[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """The image and the video placeholders of the prompt."""
        image_mask = ids == self.vlm_cfg.image_token_id
        video_mask = ids == self.vlm_cfg.video_token_id
        if generated_from is not None:  # generated placeholder ids are plain tokens, as in HF's decode steps
            image_mask[:, generated_from:] = False
            video_mask[:, generated_from:] = False
        return image_mask, video_mask

    def prompt_positions(self, inputs: VLMInputs, position_ids: Tensor | None, cache: KVCache | None) -> Tensor | None:
        """The given positions, else the 3D positions of a prompt with images or videos."""
        if position_ids is not None or (inputs.image_grid_thw is None and inputs.video_grid_thw is None):
            # Text only, HF counts positions from the cache length (DecoderLM's default); M-RoPE then equals RoPE.
            return position_ids
        if cache is not None and cache.length:
            raise ValueError(
                "a cached step of a Qwen-VL model needs position_ids (its 3D positions continue the prompt's); "
                "model.generate passes them"
            )
        return self.rope_index(inputs, inputs.attention_mask)

    def _visual_features(
        self, inputs: VLMInputs, image_mask: Tensor, video_mask: Tensor
    ) -> Float[Tensor, "n_visual_tokens d_model"] | None:
        """Image and video features in the order of their placeholders (images and videos interleaved)."""
        present = self._checked_visuals(inputs, image_mask, video_mask)
        if not present:
            return None
        # One vision run for all images and videos, so every hook fires once per forward pass.
        features = self._encode(torch.cat([p for p, _ in present]), torch.cat([g for _, g in present]))
        return features if len(present) == 1 else interleave(features, image_mask, video_mask)

    def _checked_visuals(
        self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"], video_mask: Bool[Tensor, "batch pos"]
    ) -> list[tuple[Tensor, Tensor]]:
        """(pixels, grid) of the images, then of the videos, where given, each checked against its placeholders."""
        merge = self.vlm_cfg.geometry.merge_size
        image = _checked(inputs.pixel_values, inputs.image_grid_thw, image_mask, "image", merge)
        video = self._checked_videos(inputs, video_mask)
        return [pair for pair in (image, video) if pair is not None]

    def _checked_videos(self, inputs: VLMInputs, video_mask: Bool[Tensor, "batch pos"]) -> tuple[Tensor, Tensor] | None:
        """(pixels, grid) of the videos, checked against their placeholders: one run per video."""
        merge = self.vlm_cfg.geometry.merge_size
        return _checked(inputs.pixel_values_videos, inputs.video_grid_thw, video_mask, "video", merge)

    def rope_index(self, inputs: VLMInputs, mask: Tensor | None) -> Int[Tensor, "3 batch pos"]:
        """3D positions from HF's own ``get_rope_index`` (images, videos, text, left padding)."""
        cfg = self.vlm_cfg
        ids = inputs.input_ids
        # What the processor returns: 1 at image, 2 at video placeholders. Given ones must say the same, or the
        # positions (and so the logits) change with no error.
        types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        given = inputs.mm_token_type_ids
        if given is not None:
            wrong = given.shape != ids.shape or bool((given.to(types.device) != types).any())
            if wrong:
                raise ValueError(
                    f"mm_token_type_ids (shape {tuple(given.shape)}) disagree with the image / video placeholders in "
                    f"input_ids (shape {tuple(ids.shape)}); pass the processor's mm_token_type_ids with its input_ids, "
                    "or leave them out (they follow from the placeholders)"
                )
        return qwen_rope_index(
            self.hf_class, cfg.hf_config, ids, mm_token_type_ids=types.to(ids.device),
            image_grid_thw=inputs.image_grid_thw, video_grid_thw=inputs.video_grid_thw, attention_mask=mask,
            **self.rope_kwargs(inputs),
        )

    def rope_kwargs(self, inputs: VLMInputs) -> dict:
        return {}

    def prefill_positions(self, inputs: VLMInputs, mask: Tensor) -> Tensor:
        if inputs.image_grid_thw is None and inputs.video_grid_thw is None:
            return super().prefill_positions(inputs, mask)
        # Decode steps then continue each axis by one per token (HF's generate), from positions[..., -1:].
        return self.rope_index(inputs, mask)

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per visual placeholder, in order: source (``kind`` "patch" for images, "video" for videos) and its
        index ``image``, vision-tower row ``tile`` (images, then videos), first ``patch`` of its merge block in
        that row, temporal patch ``t``, (``row``, ``col``) in the merged grid (patch rows ``merge * row`` ..) and
        pixel box ``x0, y0, x1, y1`` in the resized image, or in the original image when ``original_sizes``
        (width, height per image) are given. Video boxes are in resized frame pixels."""
        cfg = self.vlm_cfg
        ids = inputs.input_ids
        grids = {
            "patch": inputs.image_grid_thw.tolist() if inputs.image_grid_thw is not None else [],
            "video": inputs.video_grid_thw.tolist() if inputs.video_grid_thw is not None else [],
        }
        queues = {}
        for kind, kind_grids in grids.items():
            first_row = 0 if kind == "patch" else len(grids["patch"])
            sizes = original_sizes if kind == "patch" else None
            queues[kind] = iter(
                [cell for i, grid in enumerate(kind_grids) for cell in _cells(cfg.geometry, kind, i, first_row + i, grid, sizes)]
            )
        visual = ids[self.image_token_mask(ids)].tolist()
        return [next(queues["patch" if token == cfg.image_token_id else "video"]) for token in visual]


class HookedQwen25VL(HookedQwen2VL):
    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    input_fields = HookedQwen2VL.input_fields | {"second_per_grid_ts"}
    hf_class = Qwen2_5_VLModel

    @classmethod
    def geometry(cls, vc) -> PatchGeometry:
        return PatchGeometry(
            vc.patch_size, vc.temporal_patch_size, vc.in_channels, vc.spatial_merge_size,
            window_size=vc.window_size, full_attention_blocks=tuple(vc.fullatt_block_indexes),
        )

    @classmethod
    def projector_width(cls, vc) -> int:
        return vc.out_hidden_size

    def rope_kwargs(self, inputs: VLMInputs) -> dict:
        return {"second_per_grid_ts": inputs.second_per_grid_ts}


def _checked(
    pixels: Tensor | None, grid: Tensor | None, mask: Bool[Tensor, "batch pos"], kind: str, merge: int
) -> tuple[Tensor, Tensor] | None:
    """(pixels, grid) of one modality after checking them against each other and the placeholders."""
    pixel_name, grid_name, placeholder = (
        ("pixel_values", "image_grid_thw", "<|image_pad|>") if kind == "image"
        else ("pixel_values_videos", "video_grid_thw", "<|video_pad|>")
    )
    n_placeholders = int(mask.sum())
    if pixels is None:
        if n_placeholders:
            raise ValueError(
                f"input_ids hold {n_placeholders} {kind} placeholder tokens ({placeholder}) but no {pixel_name} were "
                f"given; pass the processor's {pixel_name} and {grid_name}, or drop the placeholders"
            )
        if grid is not None:
            raise ValueError(f"{grid_name} was given without {pixel_name}; pass both from the same processor call")
        return None
    if grid is None:
        raise ValueError(f"{pixel_name} needs {grid_name}, the (t, h, w) patch grid of each {kind} (from the processor)")
    if not n_placeholders:
        raise ValueError(
            f"{pixel_name} were given but input_ids hold no {placeholder} token, so the {kind} would be ignored; "
            f"build prompt and {kind}s together with the processor"
        )
    if grid.ndim != 2 or grid.shape[1] != 3 or bool((grid[:, 1:] % merge).any()) or bool((grid <= 0).any()):
        raise ValueError(
            f"{grid_name} must be [n_{kind}s, 3] rows of positive (t, h, w) with h and w multiples of the merge size "
            f"{merge}, got {grid.tolist()}"
        )
    patches = grid.prod(-1)
    if pixels.shape[0] != int(patches.sum()):
        raise ValueError(
            f"{grid_name} {grid.tolist()} implies {int(patches.sum())} patches (t*h*w per {kind}) but {pixel_name} "
            f"holds {pixels.shape[0]} rows; pass {pixel_name} and {grid_name} from the same processor call"
        )
    tokens = (patches // merge**2).tolist()
    runs = placeholder_runs(mask)
    if runs != tokens:
        raise ValueError(
            f"the {placeholder} placeholders form runs of {runs} tokens but {grid_name} gives {tokens} tokens per "
            f"{kind} (t*h*w / {merge}**2); expand each {kind}'s placeholder with the processor so the counts match"
        )
    return pixels, grid.to(pixels.device)


def _cells(g: PatchGeometry, kind: str, index: int, row: int, grid: list[int], original_sizes) -> list[dict]:
    t, h, w = grid
    m, side = g.merge_size, g.merge_size * g.patch_size
    sx = sy = 1.0
    if original_sizes is not None:
        width, height = original_sizes[index]
        sx, sy = width / (w * g.patch_size), height / (h * g.patch_size)
    cells = []
    for token in range(t * (h // m) * (w // m)):
        frame, rest = divmod(token, (h // m) * (w // m))
        r, c = divmod(rest, w // m)
        cells.append(dict(
            image=index, tile=row, patch=token * m * m, t=frame, row=r, col=c, kind=kind,
            x0=c * side * sx, y0=r * side * sy, x1=(c + 1) * side * sx, y1=(r + 1) * side * sy,
        ))
    return cells
