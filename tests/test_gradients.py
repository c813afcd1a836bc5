"""Gradients through every tower, and attribution patching against real activation patching."""

from __future__ import annotations

import torch
from transformer_lens import patching

from conftest import PROMPTS
from tl_vlm.analysis.attribution import attribution_patch
from tl_vlm.zoo.data import sample_images


def test_backward_cache_reaches_every_tower_and_the_pixels(llava15):
    model, hf = llava15.model, llava15.hf
    inputs = llava15.batch()
    pixels = inputs.pixel_values.clone().requires_grad_(True)
    inputs.pixel_values = pixels
    loss, cache = model.run_with_cache(inputs, return_type="loss", incl_bwd=True, reset_hooks_end=True)
    for name in ("blocks.0.hook_resid_pre_grad", "vision.blocks.0.attn.hook_z_grad", "projector.hook_out_grad"):
        assert name in cache and cache[name].abs().max() > 0, name
    ours = pixels.grad.clone()
    hf_pixels = inputs.pixel_values.detach().clone().requires_grad_(True)
    kwargs = {**inputs.as_kwargs(), "pixel_values": hf_pixels}
    labels = kwargs["input_ids"].masked_fill(model.image_token_mask(kwargs["input_ids"]) | (kwargs["attention_mask"] == 0), -100)
    hf(**kwargs, labels=labels).loss.backward()
    assert torch.allclose(ours, hf_pixels.grad, atol=1e-6), "pixel gradients equal HF's"


def test_attribution_patching_tracks_activation_patching(llava15):
    model = llava15.model
    a, b = sample_images(2, seed=8)
    clean = model.prepare(images=a, text=PROMPTS[0])
    corrupt = model.prepare(images=b, text=PROMPTS[0])
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())
    metric = lambda out: out[0, -1, token]  # noqa: E731
    attr = attribution_patch(model, clean, corrupt, metric, lambda n: n.endswith("hook_resid_pre") and not n.startswith("vision"))
    estimated = torch.stack([attr[f"blocks.{l}.hook_resid_pre"][0] for l in range(model.cfg.n_layers)])
    with torch.no_grad():
        actual = patching.get_act_patch_resid_pre(model, corrupt, cache, metric) - metric(model(corrupt))
    r = torch.corrcoef(torch.stack([estimated.flatten(), actual.flatten().cpu()]))[0, 1].item()
    print(f"attribution vs activation patching (language resid_pre x position): Pearson r = {r:.3f}")
    assert r > 0.9
    vision = model.tower("vision")
    vattr = attribution_patch(vision, clean, corrupt, metric, lambda n: n == "blocks.0.hook_resid_pre")
    assert vattr["blocks.0.hook_resid_pre"].shape == (1, 26), "[image, patch] attributions in the vision view"
