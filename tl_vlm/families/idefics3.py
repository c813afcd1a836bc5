"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``): SigLIP ViT over
padded sub-images -> pixel shuffle -> one linear map -> Llama / SmolLM2.

How image features enter the language stream (HF's order): the processor splits each image into a grid of
``max_image_size`` sub-images (row-major) plus the global image (the whole image, resized), each written in the
prompt as ``<fake_token_around_image><row_r_col_c>`` (``<global-img>`` for the global one) followed by
``image_seq_len`` ``<image>`` tokens. ``pixel_values`` is ``[prompt, sub-image, 3, H, W]``, zero-padded to the
prompt with the most sub-images (all-zero sub-images are padding and are dropped, as HF does), with
``pixel_attention_mask`` ``[prompt, sub-image, H, W]`` marking real pixels (an image smaller than the canvas is
padded bottom-right). Patches with any real pixel are real: padded patches are masked as keys and positions are
bucketed to the real extent (``towers/patch_mask_vit``). The pixel shuffle (``towers/pixel_shuffle``) folds
``scale x scale`` patches into one token, padded ones included, as HF.

Vision and projector rows are the real sub-images, prompt by prompt, in processor order (each image's grid, then
its global image); ``model.vision.patch_mask`` holds the patch mask of the last forward. ``row_images`` from
``prepare`` is 1 per prompt: ``pixel_values`` is per prompt.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.capabilities import Capabilities
from tl_vlm.components import Rotary
from tl_vlm.config import ViTConfig, ViTVLMConfig
from tl_vlm.convert.hf_modules import ModuleRule, decoder_lm_modules, vit_modules
from tl_vlm.convert.rules import Rule, WeightMap, norm_rules
from tl_vlm.convert.text_lms import decoder_lm_config, decoder_lm_rules
from tl_vlm.convert.vits import vit_rules
from tl_vlm.hooked_vlm import HookedVLM
from tl_vlm.inputs import VLMInputs
from tl_vlm.towers import DecoderLM
from tl_vlm.towers.patch_mask_vit import PatchMaskViTTower
from tl_vlm.towers.pixel_shuffle import PixelShuffleConfig, PixelShuffleProjector, token_patches


def patch_vision_config(vc) -> ViTConfig:
    """Idefics3 / SmolVLM vision config -> a SigLIP-flavoured ViTConfig (patch bias, no class token, no pre-LN, the
    post-LN that the connector reads)."""
    return ViTConfig(
        n_layers=vc.num_hidden_layers, d_model=vc.hidden_size, n_heads=vc.num_attention_heads,
        d_head=vc.hidden_size // vc.num_attention_heads, d_mlp=vc.intermediate_size, act_fn=vc.hidden_act,
        normalization_type="LN", eps=vc.layer_norm_eps, n_ctx=(vc.image_size // vc.patch_size) ** 2, attn_bias=True,
        attn_out_bias=True, mlp_bias=True, attention_dir="bidirectional", positional_embedding_type="standard",
        original_architecture=type(vc).__name__.removesuffix("Config") + "Transformer", hf_config=vc,
        image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels, class_token=False,
        patch_bias=True, ln_pre=False, ln_post=True,
    )


@dataclass
class Idefics3Config(ViTVLMConfig):
    scale: int = 2  # scale x scale patches per language token

    @property
    def image_seq_len(self) -> int:
        return (self.vision.grid // self.scale) ** 2


class SmolVLMImageTextProcessor:
    """SmolVLM's processor without its video processor (which needs torchvision): HF's ``Idefics3Processor`` over
    the checkpoint's tokenizer and image processor, whose image prompts SmolVLM's processor writes the same way."""

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoImageProcessor, AutoTokenizer, Idefics3Processor

        config = json.loads((Path(path) / "processor_config.json").read_text())
        return Idefics3Processor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                 image_seq_len=config["image_seq_len"])


class HookedIdefics3(HookedVLM):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    input_fields = HookedVLM.input_fields | {"pixel_attention_mask"}
    vlm_cfg: Idefics3Config

    # ------------------------------------------------------------------ conversion

    @classmethod
    def config_from_hf(cls, hf_config) -> Idefics3Config:
        vc = hf_config.vision_config
        return Idefics3Config(
            architecture=hf_config.architectures[0] if hf_config.architectures else cls.architectures[0],
            family=cls.family,
            language=decoder_lm_config(hf_config.get_text_config(), getattr(hf_config, "_name_or_path", "")),
            vision=patch_vision_config(vc),
            image_token_id=hf_config.image_token_id,
            hf_config=hf_config,
            scale=hf_config.scale_factor,
        )

    @classmethod
    def hf_module_rules(cls, cfg: Idefics3Config) -> list[ModuleRule]:
        return [
            *vit_modules("model.vision_model", "vision", cfg.vision),
            ModuleRule("model.connector", "projector.hook_out"),
            *decoder_lm_modules("model.text_model"),
            ModuleRule("lm_head", "unembed"),
        ]

    @classmethod
    def normalize_key(cls, key: str) -> str:
        return re.sub(r"^model\.(?=text_model\.|vision_model\.|connector\.)", "", key)

    @classmethod
    def weight_map(cls, cfg: Idefics3Config) -> WeightMap:
        return WeightMap(
            [
                # SigLIP's keys; vit_rules reads ln_post as "EVA" (fused qkv), so it gets the flavour without it.
                *vit_rules(r"vision_model", "vision", dataclasses.replace(cfg.vision, ln_post=False)),
                *norm_rules(r"vision_model\.post_layernorm", "vision.ln_post"),
                Rule(r"connector\.modality_projection\.proj\.weight", "projector.W", lambda t: t.T),
                *decoder_lm_rules(r"text_model", cfg.language),
            ]
        )

    def build(self) -> None:
        cfg = self.vlm_cfg
        self.attach_language(DecoderLM(cfg.language, Rotary.from_hf_config(cfg.language.hf_config)))
        self.vision = PatchMaskViTTower(cfg.vision)
        self.projector = PixelShuffleProjector(
            PixelShuffleConfig(d_vision=cfg.vision.d_model, scale=cfg.scale, d_out=cfg.language.d_model,
                               d_hidden=None, act_fn="", ln=False)
        )

    @property
    def capabilities(self) -> Capabilities:
        # Rows are whole canvases (padding inside them is in the spatial index), not padded to the longest image.
        return Capabilities(tiles=True, patches_per_token=self.vlm_cfg.scale**2)

    def hf_layers(self, hf_model) -> dict[str, list]:
        return {"language": list(hf_model.model.text_model.layers), "vision": list(hf_model.model.vision_model.encoder.layers)}

    # ------------------------------------------------------------------ running

    def real_sub_images(self, inputs: VLMInputs) -> tuple[Tensor, Tensor]:
        """The real sub-images ``[sub-image, 3, H, W]`` (HF drops all-zero ones as padding) and their patch masks
        ``[sub-image, h, w]``, with clear errors for inputs HF would misread."""
        pixels, pixel_mask = inputs.pixel_values, inputs.pixel_attention_mask
        if pixels.ndim != 5:
            raise ValueError(
                f"{self.family} pixel_values must be [prompt, sub-image, channel, height, width], got "
                f"{tuple(pixels.shape)}; build them with the model's processor (model.prepare)"
            )
        prompts, slots, _, height, width = pixels.shape
        if pixel_mask is not None and tuple(pixel_mask.shape) != (prompts, slots, height, width):
            raise ValueError(
                f"pixel_attention_mask has shape {tuple(pixel_mask.shape)} but pixel_values {tuple(pixels.shape)} "
                f"needs {(prompts, slots, height, width)}; pass both from the same processor call"
            )
        pixels = pixels.flatten(0, 1)
        real = (pixels != 0).flatten(1).any(-1)
        if pixel_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], height, width, dtype=torch.bool, device=pixels.device)
        else:
            pixel_mask = pixel_mask.flatten(0, 1).bool()
        pixels, pixel_mask = pixels[real], pixel_mask[real]
        ps = self.vlm_cfg.vision.patch_size
        patches = F.max_pool2d(pixel_mask[:, None].float(), ps)[:, 0].bool()  # a patch is real if any pixel is
        empty = (~patches.flatten(1).any(-1)).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(
                f"sub-images {empty} (of the real, non-zero ones) have no real pixel in pixel_attention_mask: all "
                "padding, they have no extent to read; pass the processor's pixel_attention_mask"
            )
        return pixels, patches

    def image_features(self, inputs: VLMInputs) -> Float[Tensor, "n_image_tokens d_model"]:
        pixels, patches = self.real_sub_images(inputs)
        hidden = self.vision(pixels.to(self.vision.embed.W_patch.dtype), patches)
        return self.projector(self.vision.ln_post(hidden)).flatten(0, 1)

    def checked_image_features(self, inputs: VLMInputs, image_mask: Bool[Tensor, "batch pos"]) -> Tensor | None:
        """Sub-images against ``<image>`` tokens first, so a mismatch names sub-images, not feature vectors."""
        if inputs.pixel_values is not None and image_mask.any():
            n_sub = self.real_sub_images(inputs)[0].shape[0]
            per = self.vlm_cfg.image_seq_len
            if n_sub * per != int(image_mask.sum()):
                raise ValueError(
                    f"pixel_values hold {n_sub} real sub-images ({n_sub * per} image features, {per} each) but input_ids "
                    f"hold {int(image_mask.sum())} <image> tokens; build prompt and images together with the model's "
                    "processor (model.prepare)"
                )
        return super().checked_image_features(inputs, image_mask)

    def prepare(self, images=None, text=None, **processor_kwargs) -> VLMInputs:
        """As HookedVLM's; ``row_images`` is 1 per prompt, since ``pixel_values`` holds each prompt's sub-images."""
        inputs = super().prepare(images=images, text=text, **processor_kwargs)
        if inputs.pixel_values is None:
            return inputs
        return dataclasses.replace(inputs, row_images=(1,) * inputs.pixel_values.shape[0])

    # ------------------------------------------------------------------ analysis

    def image_token_cells(self, inputs: VLMInputs, original_sizes) -> list[dict]:
        """Per image token: its image, vision row (``tile``: the real sub-image), ``crop`` ("global" or (row, col) of
        the split grid, read from the ``<row_r_col_c>`` / ``<global-img>`` token before it), the top-left patch and
        all the patches it holds, its (row, col) in the sub-image's token grid, and its pixel box in the original
        image (sub-image pixels when ``original_sizes`` is None). ``kind`` is "padding" for a token whose patches
        are all padding. The split grid covers the whole image (the processor resizes it to the grid), the global
        image is the whole image resized to its real pixels."""
        cfg = self.vlm_cfg
        pixels, patches = self.real_sub_images(inputs)
        ps = cfg.vision.patch_size
        side = pixels.shape[-1] // ps
        blocks, g = token_patches(side, cfg.scale), side // cfg.scale
        crops = self._crops(inputs.input_ids)
        if len(crops) != pixels.shape[0]:
            raise ValueError(f"input_ids hold {len(crops)} runs of <image> tokens for {pixels.shape[0]} real sub-images; "
                             "build prompt and images together with the model's processor (model.prepare)")
        cells = []
        for tile, (image, crop) in enumerate(crops):
            mask = patches[tile]
            geometry = lambda x, y: (float(x), float(y))  # noqa: E731  (sub-image pixels)
            if original_sizes is not None:
                w, h = original_sizes[image]
                if crop == "global":  # real extent: the processor pads a smaller image bottom-right
                    real_w, real_h = float(mask[0].sum() * ps), float(mask[:, 0].sum() * ps)
                    geometry = lambda x, y, w=w, h=h, a=real_w, b=real_h: (x * w / a, y * h / b)  # noqa: E731
                else:
                    rows = max(c[0] for i, c in crops if i == image and c != "global")
                    cols = max(c[1] for i, c in crops if i == image and c != "global")
                    size = pixels.shape[-1]
                    ox, oy = (crop[1] - 1) * size, (crop[0] - 1) * size
                    geometry = lambda x, y, w=w, h=h, ox=ox, oy=oy, W=cols * size, H=rows * size: (  # noqa: E731
                        (x + ox) * w / W, (y + oy) * h / H)
            flat = mask.flatten()
            for t, block in enumerate(blocks):
                (r0, c0), (r1, c1) = block[0], block[-1]
                index = [r * side + c for r, c in block]
                x0, y0 = geometry(c0 * ps, r0 * ps)
                x1, y1 = geometry((c1 + 1) * ps, (r1 + 1) * ps)
                cells.append(dict(image=image, tile=tile, crop=crop, patch=index[0], patches=tuple(index), row=t // g,
                                  col=t % g, kind="patch" if bool(flat[index].any()) else "padding",
                                  x0=x0, y0=y0, x1=x1, y1=y1))
        return cells

    def _crops(self, input_ids) -> list[tuple[int, str | tuple[int, int]]]:
        """(image, crop) of each run of <image> tokens, batch-major: the run's preceding token names the crop;
        an image ends with its global crop."""
        cells, image = [], 0
        mask = self.image_token_mask(input_ids)
        for row, ids in zip(mask, input_ids):
            where = row.nonzero()[:, 0].tolist()
            starts = [p for k, p in enumerate(where) if k == 0 or where[k - 1] != p - 1]
            for start in starts:
                token = self.tokenizer.convert_ids_to_tokens(int(ids[start - 1])) if start else ""
                found = re.fullmatch(r"<row_(\d+)_col_(\d+)>", token)
                cells.append((image, (int(found[1]), int(found[2])) if found else "global"))
                image += not found
        return cells


class HookedSmolVLM(HookedIdefics3):
    family = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)
    fallback_processor = SmolVLMImageTextProcessor  # HF's SmolVLMProcessor needs torchvision (its video processor)

    @classmethod
    def load_processor(cls, path, trust_remote_code: bool):
        """HF's processor; without torchvision (``AutoProcessor`` raises a ValueError naming it) HF's Idefics3
        processor over the same files."""
        try:
            return super().load_processor(path, trust_remote_code)
        except ValueError as err:
            if "torchvision" not in str(err):
                raise
            warnings.warn(f"HF's processor for SmolVLM cannot load ({err}); using HF's Idefics3Processor over its files")
            return cls.fallback_processor.from_pretrained(path)
