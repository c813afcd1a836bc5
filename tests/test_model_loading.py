"""The loading steps HookedVLM and HookedCLIP share (convert/model_loading.py): a checkpoint without a weight its
config requires is a clear error in both, a half-precision load keeps HF's float32 weights float32, and tower configs
follow their weights after ``.to``."""

from __future__ import annotations

import shutil

import pytest
import torch
from conformance.registry import quiet
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration

from tl_vlm import HookedCLIP, HookedVLM
from tl_vlm.zoo.tiny import build_tiny_vlm
from tl_vlm.zoo.tiny_blip2 import build_tiny_blip2
from tl_vlm.zoo.tiny_clip import build_tiny_clip


def _without(path, tmp_path, dropped: str):
    """A copy of the checkpoint at ``path`` whose safetensors lack the tensor ``dropped``."""
    target = tmp_path / "truncated"
    shutil.copytree(path, target)
    tensors = load_file(target / "model.safetensors")
    assert dropped in tensors
    del tensors[dropped]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("loader, build, variant, dropped", [
    (HookedVLM, build_tiny_vlm, "llava15", "multi_modal_projector.linear_2.bias"),
    (HookedCLIP, build_tiny_clip, "clip", "text_model.final_layer_norm.weight"),
    (HookedCLIP, build_tiny_clip, "siglip", "vision_model.head.probe"),
])
def test_a_missing_weight_is_named(tmp_path, loader, build, variant, dropped):
    path = build(tmp_path / variant, variant)
    quiet(loader.from_pretrained, path)  # the full checkpoint loads
    with pytest.raises(ValueError, match=r"checkpoint lacks 1 weights the config requires .*\['[a-z_.]+'\]$"):
        quiet(loader.from_pretrained, _without(path, tmp_path, dropped))


def test_half_precision_keeps_hf_float32_weights(tmp_path):
    """BLIP-2's Q-Former is float32 in HF's float16 model; loading or converting in float16 must not round it."""
    path = build_tiny_blip2(tmp_path / "blip2", "blip2_opt")
    hf = quiet(Blip2ForConditionalGeneration.from_pretrained, path, dtype=torch.float16)
    for model in (quiet(HookedVLM.from_pretrained, path, dtype=torch.float16), HookedVLM.from_hf_model(hf)):
        assert model.W_E.dtype == torch.float16
        assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}


def test_tower_configs_follow_the_weights_after_to(tmp_path):
    """``.to`` / ``.half()`` on a dual encoder: both towers' ``cfg.dtype`` follow their weights (TL's tools read it)."""
    model = quiet(HookedCLIP.from_pretrained, build_tiny_clip(tmp_path / "clip", "clip"))
    model.half()
    assert model.vision.cfg.dtype == model.text.cfg.dtype == torch.float16
    model.to(torch.float32)
    assert model.vision.cfg.dtype == model.text.cfg.dtype == torch.float32 and model.text.cfg.device == "cpu"
