"""Every family converts at its real size on the meta device: HF's default config is the flagship checkpoint's
shape, so its weight map, tower configs and hook names are checked at full size without a byte of weights."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import REGISTRY, params, quiet
from transformers import AutoModelForImageTextToText, T5Config

from tl_vlm import HookedVLM


def flagship_config(name: str):
    if REGISTRY[name].flagship is not None:
        return REGISTRY[name].flagship()
    config_class = REGISTRY[name].hf_class.config_class
    if name.endswith("flan_t5"):  # HF's BLIP-2 default is OPT; the Flan-T5 checkpoints' LM is T5's
        return config_class(text_config=T5Config(is_gated_act=True, dense_act_fn="gelu_new", decoder_start_token_id=0).to_dict())
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
