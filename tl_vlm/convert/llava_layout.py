"""The checkpoint layout HF's LLaVA, PaliGemma and Gemma 3 share: ``vision_tower``, ``multi_modal_projector`` and
``language_model`` beside ``lm_head``.

In memory (transformers 5) the three parts sit under ``model.*``; saved files nest the LM as
``language_model.model.*`` (its head as ``language_model.lm_head.*``) and older hub files nest the ViT as
``vision_tower.vision_model.*``. The weight rules read one layout: ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.*``, ``lm_head.*`` (and LLaVA-NeXT's ``image_newline``).
"""

from __future__ import annotations

import re

# HF module-name prefixes: (transformers >= 4.52, older), as HookedVLM.legacy_module_prefixes.
LEGACY_MODULE_PREFIXES = (
    ("model.language_model", "language_model.model"), ("model.vision_tower", "vision_tower.vision_model"),
    ("model.multi_modal_projector", "multi_modal_projector"), ("lm_head", "language_model.lm_head"),
)


def llava_layout_key(key: str) -> str:
    """A checkpoint key in any of the layouts above, in the one the weight rules read."""
    key = re.sub(r"^model\.(?=language_model\.|vision_tower\.|multi_modal_projector\.|image_newline)", "", key)
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
    return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
