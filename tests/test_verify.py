"""verify passes on a correct conversion and fails, naming tower and layer, on a perturbed weight."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tl_vlm import HookedVLM
from tl_vlm.cli import main
from tl_vlm.verify import verify


def test_verify_passes_then_names_the_broken_layer(pair):
    report = verify(str(pair.path))
    assert report.passed, report.table()
    assert {d.tower for d in report.layers} == {"language", "vision"} and report.generation_agreement == 1.0

    model = HookedVLM.from_pretrained(pair.path)
    mlp = model.blocks[1].mlp
    perturbed = mlp.W_out.detach().clone()
    perturbed[0, 0] += 0.5
    mlp.W_out = nn.Parameter(perturbed)
    broken = verify(model)
    assert not broken.passed
    assert any(f.startswith("language layer 1") for f in broken.failures), broken.failures
    assert not any(f.startswith("language layer 0") for f in broken.failures)

    vision = HookedVLM.from_pretrained(pair.path)
    attn = vision.vision.blocks[0].attn
    attn.W_Q = nn.Parameter(attn.W_Q.detach() * 1.5)
    assert any(f.startswith("vision layer 0") for f in verify(vision).failures)


def test_verify_with_processing_and_lower_precision(llava15):
    report = verify(str(llava15.path), fold_ln=True, center_unembed=True)
    assert report.passed and report.compared == "probabilities", report.table()
    half = verify(str(llava15.path), dtype="bf16")
    assert "HF in dtype vs HF fp32, logits max|d|" in half.dtype_noise
    assert half.passed, half.table()


def test_verify_cli_exit_status(llava15, tmp_path):
    assert main(["verify", str(llava15.path), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "verify.json").read_text())
    assert data["passed"] and (tmp_path / "verify.md").exists()


@pytest.mark.parametrize("variant", ["blip2_opt", "instructblip_flan_t5"])
def test_verify_blip2_names_the_qformer_layer(tmp_path_factory, variant):
    from tl_vlm.zoo.tiny_blip2 import build_tiny_blip2

    path = build_tiny_blip2(tmp_path_factory.mktemp(variant), variant)
    assert verify(str(path)).passed
    model = HookedVLM.from_pretrained(path)
    block = model.qformer.blocks[1]
    block.mlp.W_out = nn.Parameter(block.mlp.W_out.detach() * 1.5)
    failures = verify(model).failures
    assert any(f.startswith("qformer layer 1") for f in failures) and not any(f.startswith("qformer layer 0") for f in failures)


def test_qwen_prepare_verify_and_demo_without_torchvision(tmp_path_factory):
    """HF's Qwen-VL processor needs torchvision for videos; images still go through model.prepare."""
    import warnings

    from tl_vlm.prompts import format_prompt
    from tl_vlm.zoo.data import sample_images
    from tl_vlm.zoo.tiny_qwen_vl import build_tiny_qwen_vl

    path = build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen"), "qwen2_vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(str(path))
        assert report.passed and report.generation_agreement == 1.0, report.table()
        model = HookedVLM.from_pretrained(path)
        inputs = model.prepare(images=sample_images(2, sizes=[(40, 28), (28, 56)]),
                               text=[format_prompt(model.processor, "What colour?")] * 2)
        assert inputs.image_grid_thw.shape == (2, 3) and int(model.image_token_mask(inputs.input_ids).sum(1)[0]) > 0
        out = tmp_path_factory.mktemp("demo")
        assert main(["demo", str(path), "--out", str(out)]) == 0
        block = model.blocks[1]
        block.mlp.W_out = nn.Parameter(block.mlp.W_out.detach() * 1.5)
        failures = verify(model).failures
    assert any(f.startswith("language layer 1") for f in failures) and not any(f.startswith("language layer 0") for f in failures)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_verify_qwen_vision_blocks_in_hf_packing(tmp_path_factory, variant):
    """HF packs the vision patches of all images into one sequence (Qwen2.5-VL in window order); verify unpacks."""
    import warnings

    from tl_vlm.zoo.data import sample_images
    from tl_vlm.zoo.tiny_qwen_vl import build_tiny_qwen_vl

    path = build_tiny_qwen_vl(tmp_path_factory.mktemp(variant), variant)
    images = sample_images(2, sizes=[(40, 28), (28, 56)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = verify(str(path), images=images)
        assert report.passed, report.table()
        vision_layers = [d for d in report.layers if d.tower == "vision"]
        model = HookedVLM.from_pretrained(path)
        assert len(vision_layers) == model.vision.cfg.n_layers and max(d.max_abs for d in vision_layers) < 1e-4
        with torch.no_grad():
            model.vision.blocks[1].mlp.W_out.mul_(1.5)  # this model's own copy of the weights
        failures = verify(model, images=images).failures
    assert any(f.startswith("vision layer 1") for f in failures) and not any(f.startswith("vision layer 0") for f in failures)
