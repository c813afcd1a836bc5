"""LLaVA 1.5 (``LlavaForConditionalGeneration``): CLIP or SigLIP ViT -> MLP projector -> Llama / Mistral / Qwen2 LM."""

from __future__ import annotations

import re

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.config import TowerConfig, VLMConfig
from tl_vlm.families.base import Family
from tl_vlm.families.weights import Rule, WeightMap, clip_vision_rules, decoder_lm_rules, linear_rules
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import CLIPVisionTower, MLPProjector
from tl_vlm.towers.projector import ProjectorConfig

# Which projections carry biases, per language model type: (attention biases, mlp bias).
_LM_BIASES = {
    "llama": lambda c: (("q", "k", "v", "o") if c.attention_bias else (), bool(getattr(c, "mlp_bias", False))),
    "mistral": lambda c: ((), False),
    "qwen2": lambda c: (("q", "k", "v"), False),
}


_VISION_TOWERS = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def clip_vision_config(vc) -> TowerConfig:
    if vc.model_type not in _VISION_TOWERS:
        raise NotImplementedError(
            f"vision tower {vc.model_type!r} is not supported yet; tl_vlm converts {sorted(_VISION_TOWERS)} for LLaVA"
        )
    siglip = vc.model_type == "siglip_vision_model"
    return vit_config(vc, attn_bias=True, original_architecture=_VISION_TOWERS[vc.model_type], class_token=not siglip)


def has_class_token(cfg: TowerConfig) -> bool:
    return cfg.original_architecture != "SiglipVisionModel"


def vit_config(vc, attn_bias: bool, original_architecture: str, class_token: bool = True) -> TowerConfig:
    """A ViT with learned positions and pre-norm LayerNorm blocks (CLIP, SigLIP, BLIP-2's EVA)."""
    return TowerConfig(
        n_layers=vc.num_hidden_layers,
        d_model=vc.hidden_size,
        n_heads=vc.num_attention_heads,
        d_head=vc.hidden_size // vc.num_attention_heads,
        d_mlp=vc.intermediate_size,
        act_fn=vc.hidden_act,
        normalization_type="LN",
        eps=vc.layer_norm_eps,
        n_ctx=(vc.image_size // vc.patch_size) ** 2 + class_token,
        attn_bias=attn_bias,
        attn_out_bias=True,
        mlp_bias=True,
        attention_dir="bidirectional",
        positional_embedding_type="standard",
        original_architecture=original_architecture,
    )


def decoder_lm_config(
    tc, name: str, attn_biases: tuple[str, ...] | None = None, head_dim: int | None = None, tie: bool | None = None
) -> TowerConfig:
    """HF Llama-style decoder config -> TowerConfig. Families whose text config has its own model type
    (Qwen-VL's) pass the biases, head size and tying HF actually uses."""
    if attn_biases is None and tc.model_type not in _LM_BIASES:
        raise NotImplementedError(
            f"language model {tc.model_type!r} is not supported yet; supported: {sorted(_LM_BIASES)}"
        )
    if getattr(tc, "use_sliding_window", False):
        raise NotImplementedError("Qwen2 per-layer sliding-window attention is not supported yet")
    attn_bias, mlp_bias = (attn_biases, False) if attn_biases is not None else _LM_BIASES[tc.model_type](tc)
    head_dim = head_dim or getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    tie = bool(tc.tie_word_embeddings) if tie is None else tie
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
        extra={"hf_config": tc, "attn_biases": attn_bias, "tie_word_embeddings": tie},
    )


class LlavaFamily(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def vlm_config(self, hf_config) -> VLMConfig:
        vc, tc = hf_config.vision_config, hf_config.get_text_config()
        image_token_id = getattr(hf_config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = hf_config.image_token_index
        return VLMConfig(
            architecture=hf_config.architectures[0] if hf_config.architectures else self.architectures[0],
            family=self.name,
            language=decoder_lm_config(tc, getattr(hf_config, "_name_or_path", "")),
            vision=clip_vision_config(vc),
            image_token_id=image_token_id,
            vision_feature_layer=hf_config.vision_feature_layer,
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            num_channels=vc.num_channels,
            projector_act=hf_config.projector_hidden_act,
            projector_bias=getattr(hf_config, "multimodal_projector_bias", True),
            extra={"hf_config": hf_config},
        )

    def build_towers(self, model) -> None:
        cfg = model.vlm_cfg
        clip = has_class_token(cfg.vision)  # else SigLIP: no class token, no ln_pre, a patch bias
        model.vision = CLIPVisionTower(
            cfg.vision, cfg.image_size, cfg.patch_size, cfg.num_channels, ln_pre=clip, patch_bias=not clip, class_token=clip
        )
        d_text = cfg.language.d_model
        model.projector = MLPProjector(
            ProjectorConfig(
                d_in=cfg.vision.d_model * len(cfg.feature_layers),
                d_hidden=d_text,
                d_out=d_text,
                act_fn=cfg.projector_act,
                bias=cfg.projector_bias,
            )
        )

    def normalize_key(self, key: str) -> str:
        # In memory (transformers 5) keys sit under model.*; files nest the LM as language_model.model.* and
        # older hub files nest CLIP as vision_tower.vision_model.*.
        key = re.sub(r"^model\.(?=language_model\.|vision_tower\.|multi_modal_projector\.|image_newline)", "", key)
        key = re.sub(r"^language_model\.model\.", "language_model.", key)
        key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
        return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)

    def weight_map(self, cfg: VLMConfig) -> WeightMap:
        lm = cfg.language
        p = cfg.projector_bias
        return WeightMap(
            [
                *clip_vision_rules(r"vision_tower", "vision", cfg.vision.d_head),
                *linear_rules(r"multi_modal_projector\.linear_1", "projector.mlp.W_in", "projector.mlp.b_in" if p else None),
                *linear_rules(r"multi_modal_projector\.linear_2", "projector.mlp.W_out", "projector.mlp.b_out" if p else None),
                *decoder_lm_rules(r"language_model", lm.d_head, lm.extra["attn_biases"], lm.mlp_bias),
                *self.extra_rules(),
            ],
            # LLaVA reads patch features from the residual stream; the post-LN (and SigLIP's pooling head) only
            # serve the vision model's own pooled output.
            ignore=[r"vision_tower\.post_layernorm\.(weight|bias)", r"vision_tower\.head\..*", r".*\.position_ids",
                    r".*rotary_emb\.inv_freq"],
        )

    def extra_rules(self) -> list[Rule]:
        return []

    def select_features(self, cfg: VLMConfig, hidden: dict[int, Tensor]) -> Float[Tensor, "image patch d_in"]:
        features = [hidden[i] for i in cfg.feature_layers]
        if cfg.vision_feature_select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)

    def image_token_cells(self, model, inputs: VLMInputs, original_sizes) -> list[dict]:
        cfg = model.vlm_cfg
        cls = has_class_token(cfg.vision)
        keep_cls = cls and cfg.vision_feature_select_strategy == "full"
        cells = []
        for image in range(inputs.pixel_values.shape[0]):
            if original_sizes is None:
                geometry = lambda x, y: (float(x), float(y))  # noqa: E731  (processed pixels)
            else:
                sx, sy, left, top = crop_geometry(model.processor.image_processor, original_sizes[image])
                geometry = lambda x, y, sx=sx, sy=sy, l=left, t=top: ((x + l) / sx, (y + t) / sy)  # noqa: E731
            grid = grid_cells(cfg, image, image, geometry, keep_cls, first_patch=int(cls))
            if not cls and cfg.vision_feature_select_strategy == "default":
                grid = grid[1:]  # HF's "default" drops the first token whatever it is: here a patch
            cells += grid
        return cells

    def image_features(self, model, inputs: VLMInputs) -> Tensor:
        cfg = model.vlm_cfg
        hidden = model.vision(inputs.pixel_values, keep=cfg.feature_layers)
        return model.projector(self.select_features(cfg, hidden)).flatten(0, 1)


def crop_geometry(processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x scale, y scale, left, top) of the preprocessing: CLIP's shortest edge resized then centre crop, or
    SigLIP's resize to a fixed height x width. Processed pixel (x, y) comes from original pixel
    ((x + left) / x scale, (y + top) / y scale)."""
    w, h = size
    if processor.size.get("shortest_edge"):
        sx = sy = processor.size["shortest_edge"] / min(w, h)
    else:
        sx, sy = processor.size["width"] / w, processor.size["height"] / h
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else {"height": h * sy, "width": w * sx}
    return sx, sy, (w * sx - crop["width"]) / 2, (h * sy - crop["height"]) / 2


def grid_cells(cfg: VLMConfig, image: int, tile: int, geometry, cls: bool, first_patch: int = 1) -> list[dict]:
    """Cells of one vision-tower row (an image or a tile) in patch order, boxes mapped by ``geometry``; patch
    ``first_patch`` is the top-left one (1 after a class token)."""
    ps, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
    cells = [dict(image=image, tile=tile, patch=0, row=-1, col=-1, kind="cls")] if cls else []
    for r in range(grid):
        for c in range(grid):
            x0, y0 = geometry(c * ps, r * ps)
            x1, y1 = geometry((c + 1) * ps, (r + 1) * ps)
            cells.append(dict(image=image, tile=tile, patch=first_patch + r * grid + c, row=r, col=c, kind="patch",
                              x0=x0, y0=y0, x1=x1, y1=y1))
    return cells
