"""Model families, one HookedVLM subclass per file, looked up by the HF architecture of a checkpoint."""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from tl_vlm.families.blip2 import HookedBlip2, HookedInstructBlip
from tl_vlm.families.idefics3 import HookedIdefics3, HookedSmolVLM
from tl_vlm.families.internvl import HookedInternVL
from tl_vlm.families.gemma3 import HookedGemma3
from tl_vlm.families.paligemma import HookedPaliGemma
from tl_vlm.families.llava import HookedLlava
from tl_vlm.families.llava_next import HookedLlavaNext
from tl_vlm.families.llava_onevision import HookedLlavaOnevision
from tl_vlm.families.mllama import HookedMllama
from tl_vlm.families.mistral3 import HookedMistral3
from tl_vlm.families.pixtral import HookedPixtral
from tl_vlm.families.qwen2_vl import HookedQwen2VL, HookedQwen25VL
from tl_vlm.families.qwen3_vl import HookedQwen3VL, HookedQwen3VLMoe
from tl_vlm.hooked_vlm import HookedVLM

_ALL: tuple[type[HookedVLM], ...] = (
    HookedLlava, HookedLlavaNext, HookedLlavaOnevision, HookedBlip2, HookedInstructBlip, HookedQwen2VL, HookedQwen25VL,
    HookedMllama,
    HookedQwen3VL, HookedQwen3VLMoe,
    HookedPixtral, HookedMistral3,
    HookedInternVL, HookedIdefics3, HookedSmolVLM,
    HookedGemma3, HookedPaliGemma,
)
FAMILIES: dict[str, type[HookedVLM]] = {
    arch: family for family in _ALL for arch in family.architectures if not family.vision_model_types
}
# Families that claim an architecture for some vision towers only: (architecture, vision model type) -> family.
VISION_FAMILIES: dict[tuple[str, str], type[HookedVLM]] = {
    (arch, kind): family for family in _ALL for arch in family.architectures for kind in family.vision_model_types
}

__all__ = [family.__name__ for family in _ALL] + ["FAMILIES", "VISION_FAMILIES", "family_for"]


def family_for(hf_config, architectures=None) -> type[HookedVLM]:
    """The family class for a checkpoint: by its architecture names (the config's, or the model class's), else
    by the class transformers' auto mapping gives its model type (a config built in code has no architectures)."""
    names = list(architectures if architectures is not None else getattr(hf_config, "architectures", None) or [])
    if not names and hf_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        names = [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[hf_config.model_type]]
    vision = getattr(hf_config, "vision_config", None)  # HF configs of every supported family have one
    for name in names:
        if vision is not None and (name, vision.model_type) in VISION_FAMILIES:
            return VISION_FAMILIES[name, vision.model_type]
        if name in FAMILIES:
            return FAMILIES[name]
    if set(names) & {"CLIPModel", "SiglipModel", "Siglip2Model"} or hf_config.model_type in ("clip", "siglip", "siglip2"):
        raise NotImplementedError("a CLIP / SigLIP dual encoder is not a generative VLM: load it with tl_vlm.HookedCLIP")
    raise NotImplementedError(
        f"unsupported architecture {names or hf_config.model_type!r}; tl_vlm supports: {', '.join(sorted(FAMILIES))}"
    )
