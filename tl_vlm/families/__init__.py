"""Model families, looked up by the HF architecture name in a checkpoint's config."""

from __future__ import annotations

from tl_vlm.families.base import Family
from tl_vlm.families.blip2 import Blip2Family, InstructBlipFamily
from tl_vlm.families.llava import LlavaFamily
from tl_vlm.families.llava_next import LlavaNextFamily
from tl_vlm.families.llava_onevision import LlavaOnevisionFamily
from tl_vlm.families.qwen2_vl import Qwen2VLFamily, Qwen25VLFamily

_ALL: tuple[Family, ...] = (
    LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), Blip2Family(), InstructBlipFamily(), Qwen2VLFamily(), Qwen25VLFamily()
)
FAMILIES: dict[str, Family] = {arch: fam for fam in _ALL for arch in fam.architectures}
_BY_MODEL_TYPE = {fam.name: fam for fam in _ALL}


def family_for(hf_config) -> Family:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not architectures and hf_config.model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_config.model_type]
    raise NotImplementedError(
        f"unsupported architecture {architectures or hf_config.model_type!r}; tl_vlm supports: {', '.join(sorted(FAMILIES))}"
    )


def family_named(name: str) -> Family:
    return _BY_MODEL_TYPE[name]
