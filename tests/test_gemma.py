"""Gemma 3 and PaliGemma beyond the contract (tests/conformance): the attention masks read off the patterns, the
token_type_ids rules (derived for Gemma 3, required for PaliGemma), the suffix-only loss against HF's, and the
weight processing Gemma refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.registry import quiet
from tl_vlm import HookedVLM
from tl_vlm.zoo.data import sample_images


def patterns(model, inputs) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern") and not n.startswith("vision"))
    return {i: cache[f"blocks.{i}.attn.hook_pattern"] for i in range(model.cfg.n_layers)}


def test_gemma3_image_tokens_see_their_whole_image_and_nothing_else_ahead(loaded):
    pair = loaded("gemma3")
    model, inputs = pair.model, pair.cases["multi_image"]  # row 0: two images, row 1: one
    assert model.cfg.attn_types == ["local", "global"]
    image = model.image_token_mask(inputs.input_ids)
    for layer, pattern in patterns(model, inputs).items():
        runs = image[0].nonzero()[:, 0].split(4)  # mm_tokens_per_image = 4
        first, second = runs[0].tolist(), runs[1].tolist()
        # an image token attends to a later token of the same image, in every head, on local and global layers
        assert (pattern[0, :, first[0], first[-1]] > 0).all(), layer
        # ... but not to the next image, nor to the text after its image (causal there)
        assert (pattern[0, :, first[0], second[0]] == 0).all() and (pattern[0, :, first[-1], first[-1] + 1] == 0).all()
        # text never attends ahead
        text = (~image[0] & inputs.attention_mask[0].bool()).nonzero()[:, 0].tolist()
        assert all((pattern[0, :, q, q + 1:] == 0).all() for q in text if q > 0)


def test_gemma3_sliding_layers_window_the_image_blocks_too(loaded):
    pair = loaded("gemma3")
    model, inputs = pair.model, pair.cases["batch_right"]
    window = model.cfg.sliding_window
    local = patterns(model, inputs)[0]
    q, k = torch.arange(local.shape[-2])[:, None], torch.arange(local.shape[-1])[None, :]
    assert inputs.input_ids.shape[1] > window, "the prompts exceed the window"
    assert (local[..., q - k >= window] == 0).all()


def test_gemma3_token_type_ids_are_derived_when_missing(loaded):
    """HF falls back to a plain causal mask without token_type_ids; tl_vlm builds them from the image tokens, which
    is what the processor returns."""
    pair = loaded("gemma3")
    model, inputs = pair.model, pair.cases["batch"]
    assert torch.equal(inputs.token_type_ids, model.image_token_mask(inputs.input_ids).long())
    without = dataclasses.replace(inputs, token_type_ids=None)
    with torch.no_grad():
        assert torch.equal(model(without), model(inputs))
        causal = pair.hf(**without.as_kwargs()).logits
    assert (causal - model(inputs))[inputs.attention_mask.bool()].abs().max() > 1e-3, "HF's fallback is another model"


def test_paligemma_prefix_is_bidirectional_and_suffix_causal(loaded):
    pair = loaded("paligemma2")
    model, inputs = pair.model, pair.cases["suffix"]
    real = inputs.attention_mask[0].bool()
    prefix = ((inputs.token_type_ids[0] == 0) & real).nonzero()[:, 0].tolist()
    suffix = (inputs.token_type_ids[0] == 1).nonzero()[:, 0].tolist()
    assert len(suffix) >= 2
    for layer, pattern in patterns(model, inputs).items():
        assert (pattern[0, :, prefix[0], prefix[-1]] > 0).all(), f"a prefix token sees the end of the prefix ({layer})"
        assert (pattern[0, :, prefix[-1], suffix] == 0).all(), "the prefix never sees the suffix"
        for q in suffix:  # a suffix token does not attend forward
            assert (pattern[0, :, q, q + 1:] == 0).all() and (pattern[0, :, q, q] > 0).all()


def test_paligemma_refuses_a_run_without_token_type_ids(loaded):
    pair = loaded("paligemma")
    model, inputs = pair.model, pair.cases["batch"]
    without = dataclasses.replace(inputs, token_type_ids=None)
    with pytest.raises(ValueError, match="needs token_type_ids"):
        model(without)
    with pytest.raises(ValueError, match="needs token_type_ids"):
        model.generate(without, max_new_tokens=2)
    with pytest.raises(ValueError, match="token_type_ids have shape"):
        model(dataclasses.replace(inputs, token_type_ids=inputs.token_type_ids[:, 1:]))


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_paligemma_loss_scores_the_suffix_as_hf(loaded, name):
    pair = loaded(name)
    model, inputs = pair.model, pair.cases["suffix"]
    labels = inputs.input_ids.masked_fill(inputs.token_type_ids == 0, -100)  # the processor's labels
    with torch.no_grad():
        expected = pair.hf(**inputs.as_kwargs(), labels=labels).loss
        loss = model(inputs, return_type="loss")
    assert abs(float(loss) - float(expected)) < 1e-5


def test_gemma2_center_unembed_is_refused_and_fold_ln_keeps_the_post_norms(loaded):
    pair = loaded("paligemma2")
    with pytest.raises(ValueError, match="center_unembed=True is refused"):
        quiet(HookedVLM.from_pretrained, pair.path, center_unembed=True)
    folded = quiet(HookedVLM.from_pretrained, pair.path, fold_ln=True)
    assert folded.blocks[0].ln1.w is None and folded.blocks[0].ln1_post.w is not None
    inputs = pair.cases["batch"]
    with torch.no_grad():
        assert (folded(inputs) - pair.model(inputs))[inputs.attention_mask.bool()].abs().max() < 1e-4


def test_gemma_norms_hold_one_plus_w_in_float32(loaded):
    """TL's convention (w is the scale) with HF's arithmetic: 1 + w in float32, also in a bfloat16 model."""
    pair = loaded("gemma3")
    hf_w = pair.hf.model.language_model.layers[0].post_attention_layernorm.weight
    model = quiet(HookedVLM.from_pretrained, pair.path, dtype=torch.bfloat16)
    w = model.blocks[0].ln1_post.w
    assert w.dtype == torch.float32 and torch.equal(w, hf_w.to(torch.bfloat16).float() + 1)
    assert model.blocks[0].attn.W_Q.dtype == torch.bfloat16


def test_gemma3_pan_and_scan_crops_are_images_of_their_own(loaded):
    """HF's PIL image processor crops without torchvision; each crop is one more image in its row."""
    pair = loaded("gemma3")
    model = pair.model
    wide, square = sample_images(2, seed=2, sizes=[(120, 40), (40, 40)])
    inputs = model.prepare(images=[[wide], [square]], text=["user <start_of_image> What is it? model"] * 2,
                           do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_min_ratio_to_activate=1.2)
    assert inputs.row_images == (4, 1) and inputs.pixel_values.shape[0] == 5  # original + 3 crops, and one image
    with torch.no_grad():
        logits = model(inputs)
        assert (logits - pair.hf(**inputs.as_kwargs()).logits)[inputs.attention_mask.bool()].abs().max() <= 1e-4
        row = model(inputs[1])  # the second row alone keeps its own image, not a crop of the first
    assert (row[0] - logits[1])[inputs.attention_mask[1].bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["gemma3", "paligemma"])
def test_spatial_index_covers_each_image_once(loaded, name):
    """One cell per image token; Gemma 3's pooled tokens each cover a kernel x kernel block of patches, and the
    cells of an image tile it exactly (boxes in the original image's pixels)."""
    from tl_vlm.analysis.spatial import spatial_index

    pair = loaded(name)
    model = pair.model
    images = sample_images(2, seed=1, sizes=[(60, 30), (30, 45)])
    prompts = ["user <start_of_image> What is it? model"] * 2 if name == "gemma3" else ["<image>What is it?"] * 2
    inputs = model.prepare(images=images, text=prompts)
    index = spatial_index(model, inputs, images)
    cfg = model.vlm_cfg
    per_image = cfg.mm_tokens_per_image if name == "gemma3" else cfg.vision.grid**2
    assert len(index) == 2 * per_image and index["kind"].eq("patch").all()
    for image, (w, h) in enumerate(image.size for image in images):
        cells = index[index["image"] == image]
        area = ((cells["x1"] - cells["x0"]) * (cells["y1"] - cells["y0"])).sum()
        assert abs(area - w * h) < 1e-6 * w * h and cells["x1"].max() <= w + 1e-6 and cells["y1"].max() <= h + 1e-6
    assert model.capabilities.patches_per_token == (cfg.vision.grid // cfg.tokens_per_side) ** 2 if name == "gemma3" else 1


def test_gemma_blocks_take_per_head_inputs_and_hook_mlp_in(loaded):
    """TL's use_split_qkv_input / use_hook_mlp_in reach the post-norm blocks too, leaving the output unchanged."""
    pair = loaded("paligemma2")
    model, inputs = pair.model, pair.cases["suffix"]
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        clean = model(inputs)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(("_input", "mlp_in")))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    assert {"blocks.1.attn.hook_k_input", "blocks.1.hook_mlp_in"} <= set(cache.keys())
    assert (logits - clean)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["gemma3", "paligemma2"])
def test_hf_module_names_are_hfs_bit_for_bit_in_bfloat16(checkpoint, name):
    """VLM-Lens's HF module names on Gemma: pre- and post-norms (float32 1 + w), attention and MLP before the
    post-norms, lm_head before the logit cap; bfloat16 outputs equal HF's bit for bit."""
    from conformance.registry import REGISTRY
    from test_hf_module_names import assert_same, hf_outputs
    from transformers import AutoModelForImageTextToText

    from tl_vlm.hf_names import hf_names, run_with_outputs

    entry, path = REGISTRY[name], checkpoint(name)
    hf = quiet(AutoModelForImageTextToText.from_pretrained, path, dtype=torch.bfloat16).eval()
    model = quiet(HookedVLM.from_pretrained, path, dtype=torch.bfloat16)
    inputs = quiet(entry.make_cases, model, entry)["batch"]
    table = hf_names(model)
    assert {"model.language_model.layers.0.post_feedforward_layernorm", "lm_head"} <= {e.name for e in table}
    reference = hf_outputs(hf, [e.name for e in table], inputs)
    _, ours = run_with_outputs(model, inputs, [e.target for e in table])
    for e in table:
        assert_same(entry, hf, inputs, e.name, e.target, ours[e.target], reference[e.name], atol=0)
