"""The one key layout LLaVA, PaliGemma and Gemma 3 read (convert/llava_layout.py): every way HF has saved or held
their weights maps to the same key, and the families' legacy module names are the layout's."""

from __future__ import annotations

import pytest

from tl_vlm.convert.llava_layout import LEGACY_MODULE_PREFIXES, llava_layout_key
from tl_vlm.families.gemma3 import HookedGemma3
from tl_vlm.families.llava import HookedLlava
from tl_vlm.families.paligemma import HookedPaliGemma

FORMS = {
    "language_model.layers.0.self_attn.q_proj.weight": (
        "model.language_model.layers.0.self_attn.q_proj.weight",  # in memory, transformers 5
        "language_model.model.layers.0.self_attn.q_proj.weight",  # saved files
    ),
    "lm_head.weight": ("lm_head.weight", "language_model.lm_head.weight"),
    "vision_tower.encoder.layers.1.mlp.fc1.bias": (
        "model.vision_tower.encoder.layers.1.mlp.fc1.bias",
        "vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",  # older hub files
    ),
    "multi_modal_projector.linear_1.weight": (
        "model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight",
    ),
    "image_newline": ("model.image_newline", "image_newline"),  # LLaVA-NeXT
}


@pytest.mark.parametrize("family", [HookedLlava, HookedPaliGemma, HookedGemma3], ids=lambda f: f.family)
def test_every_saved_form_maps_to_one_key(family):
    for key, forms in FORMS.items():
        assert [family.normalize_key(form) for form in forms] == [key] * len(forms)
    assert family.legacy_module_prefixes == LEGACY_MODULE_PREFIXES


def test_other_keys_pass_unchanged():
    assert llava_layout_key("model.something_else.weight") == "model.something_else.weight"
