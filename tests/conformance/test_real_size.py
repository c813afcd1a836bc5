"""Every family converts at its real size on the meta device: HF's default config is the flagship checkpoint's
shape, so its weight map, tower configs and hook names are checked at full size without a byte of weights."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import REGISTRY, params, quiet
from transformers import AutoModelForImageTextToText, Gemma2Config, SiglipVisionConfig, T5Config

from tl_vlm import HookedVLM


def flagship_config(name: str):
    config_class = REGISTRY[name].hf_class.config_class
    if name.endswith("flan_t5"):  # HF's BLIP-2 default is OPT; the Flan-T5 checkpoints' LM is T5's
        return config_class(text_config=T5Config(is_gated_act=True, dense_act_fn="gelu_new", decoder_start_token_id=0).to_dict())
    if name == "gemma3":  # HF's default pairs a 224 px SigLIP with 256 tokens, which no pooling gives; gemma-3-4b's
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                    image_size=896, patch_size=14, vision_use_head=False)
        return config_class(vision_config=vision.to_dict())
    if name == "paligemma2":  # HF's default LM is PaliGemma 1's Gemma; paligemma2-3b's is Gemma 2 2B
        text = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, vocab_size=257216)
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                    image_size=224, patch_size=14, projection_dim=2304)
        return config_class(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=2304)
    return config_class()


@pytest.mark.parametrize("name", params())
def test_flagship_shape_converts_on_meta(name):
    config = flagship_config(name)
    with torch.device("meta"):
        hf = quiet(AutoModelForImageTextToText.from_config, config)
    model = quiet(HookedVLM.from_hf_model, hf)  # raises on any HF weight it can neither place nor ignore
    assert model.device.type == "meta" and set(model.towers()) == set(REGISTRY[name].towers)
    layers = {"vision": config.vision_config.num_hidden_layers if hasattr(config.vision_config, "num_hidden_layers")
              else config.vision_config.depth}
    for tower, expected in layers.items():
        assert model.towers()[tower].cfg.n_layers == expected
    # Every HF weight has one home and no two share one (the loader already refuses unplaced keys and unloaded
    # parameters); what the weight map ignores is named there (e.g. CLIP's post-LN, which LLaVA never reads).
    weights, normalize = model.weight_map(model.vlm_cfg), model.normalize_key
    targets = [t for n, _ in hf.named_parameters() if (m := weights.match(normalize(n))) is not None
               for t in (m[0] if isinstance(m[0], tuple) else (m[0],))]
    assert len(targets) == len(set(targets))
