"""Qwen3-VL / Qwen3-VL-MoE-only behaviour (the shared contract runs on both registry entries): DeepStack as an
exact residual component and its ablation = HF surgery, interleaved M-RoPE = HF's, router and expert hooks =
HF's routing and HF surgery, per-frame video placeholders, bad input, and random small configurations (several
DeepStack layers, sparse steps, head sizes) against HF."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from conformance.registry import ATOL, max_diff, quiet
from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.components.mrope import InterleavedMultimodalRotary


# ------------------------------------------------------------------------------------------------ DeepStack


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
def test_decomposition_counts_the_deepstack_term_at_image_positions(loaded, name):
    pair = loaded(name)
    model, inputs = pair.model, pair.cases["two_images"]
    visual = model.image_token_mask(inputs.input_ids)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    n, k = model.cfg.n_layers, model.cfg.deepstack_layers
    assert k >= 1
    term = cache["blocks.0.hook_deepstack"]
    assert term[visual].abs().min() > 0 and term[~visual].abs().max() == 0, "added at the visual positions only"
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"] + term)
    for layer in range(n + 1):
        stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
        target = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        assert [label for label in labels if label.endswith("deepstack")] == [f"{i}_deepstack" for i in range(min(layer, k))]
        assert max_diff(stack.sum(0), target, visual) <= 1e-5, layer
        if layer > 0:  # without the term the image positions would not add up: the test can fail
            without = stack[[i for i, label in enumerate(labels) if not label.endswith("deepstack")]].sum(0)
            assert max_diff(without, target, visual) > 1e-3
    full, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert "0_deepstack" in labels and max_diff(full.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"]) <= 1e-4
    lens = cache.accumulated_resid()
    assert torch.equal(lens[1], cache["blocks.1.hook_resid_pre"])


def test_deepstack_ablation_by_hook_equals_hf_surgery(loaded):
    pair = loaded("qwen3_vl")
    inputs = pair.cases["batch"]
    with torch.no_grad():
        ours = pair.model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_deepstack", lambda x, hook: x.zero_())])
        fc2 = pair.hf.model.visual.deepstack_merger_list[0].linear_fc2
        saved = fc2.weight.clone(), fc2.bias.clone()
        fc2.weight.zero_(), fc2.bias.zero_()
        try:
            reference = pair.hf(**inputs.as_kwargs()).logits
        finally:
            fc2.weight.copy_(saved[0]), fc2.bias.copy_(saved[1])
        assert max_diff(ours, reference, inputs.attention_mask.bool()) <= ATOL
        assert max_diff(ours, pair.model(inputs), inputs.attention_mask.bool()) > 1e-3, "the ablation changes the logits"


def test_deepstack_mergers_read_their_vision_blocks(loaded):
    pair = loaded("qwen3_vl")
    model, inputs = pair.model, pair.cases["two_images"]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    for k, block in enumerate(model.vlm_cfg.deepstack_layers):
        assert torch.equal(cache[f"projector.deepstack.{k}.hook_in"], cache[f"vision.blocks.{block}.hook_resid_post"])
        merged = cache[f"projector.deepstack.{k}.hook_out"]
        real = merged[model.vision.patch_layout(inputs.image_grid_thw).valid[:, ::4]]
        assert torch.equal(real, cache[f"blocks.{k}.hook_deepstack"][model.image_token_mask(inputs.input_ids)])


# ------------------------------------------------------------------------------------- interleaved M-RoPE


def test_interleaved_mrope_is_hfs():
    config = Qwen3VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, head_dim=24, rope_parameters=dict(
        rope_type="default", rope_theta=5e6, mrope_section=[6, 3, 3], mrope_interleaved=True))).text_config
    hf = Qwen3VLTextRotaryEmbedding(config)
    ours = InterleavedMultimodalRotary.from_hf_config(config)
    positions = torch.randint(0, 50, (3, 2, 7))
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions.clone())
    our_cos, our_sin = ours(positions, torch.float32)
    assert torch.equal(our_cos[:, :, 0], cos) and torch.equal(our_sin[:, :, 0], sin)
    assert ours.axis.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0], "H and W interleaved, T takes the rest"


# ---------------------------------------------------------------------------------------- mixture of experts


def test_router_hooks_are_hfs_routing(loaded):
    pair = loaded("qwen3_vl_moe")
    inputs = pair.cases["batch"]
    seen = {}
    handle = pair.hf.model.language_model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            pair.hf(**inputs.as_kwargs())
            _, cache = pair.model.run_with_cache(inputs, names_filter=lambda n: n.startswith("blocks.1.mlp.hook_"))
    finally:
        handle.remove()
    logits, weights, indices = seen["out"]
    real = inputs.attention_mask.bool()
    assert max_diff(cache["blocks.1.mlp.hook_router_logits"][real], logits.view(*real.shape, -1)[real]) <= 1e-5
    assert torch.equal(cache["blocks.1.mlp.hook_expert_indices"][real], indices.view(*real.shape, -1)[real])
    assert max_diff(cache["blocks.1.mlp.hook_expert_weights"][real], weights.view(*real.shape, -1)[real]) <= 1e-6


def test_expert_ablation_by_hook_equals_hf_surgery(loaded):
    pair = loaded("qwen3_vl_moe")
    model, hf, inputs = pair.model, pair.hf, pair.cases["batch"]
    real = inputs.attention_mask.bool()
    expert = 2
    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.1.mlp.experts.{expert}.hook_out", lambda x, hook: x.zero_())])
        down = hf.model.language_model.layers[1].mlp.experts.down_proj
        saved = down[expert].clone()
        down[expert] = 0
        try:
            reference = hf(**inputs.as_kwargs()).logits
        finally:
            down[expert] = saved
    assert max_diff(ours, reference, real) <= ATOL
    assert max_diff(ours, model(inputs), real) > 1e-3, "the expert was used, so ablating it matters"


def test_expert_outputs_sum_to_the_mlp_output(loaded):
    pair = loaded("qwen3_vl_moe")
    model, inputs = pair.model, pair.cases["batch"]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("blocks.1."))
    outs = torch.stack([cache[f"blocks.1.mlp.experts.{e}.hook_out"] for e in range(model.vlm_cfg.moe.n_experts)])
    assert max_diff(outs.sum(0), cache["blocks.1.hook_mlp_out"]) <= 1e-6
    chosen = cache["blocks.1.mlp.hook_expert_indices"]
    for e in range(outs.shape[0]):
        routed = (chosen == e).any(-1)
        assert outs[e][~routed].abs().max() == 0, "an expert writes only where it was chosen"


# ------------------------------------------------------------------------------------------- video and input


def test_video_frames_have_their_own_placeholder_runs_and_cells(loaded):
    pair = loaded("qwen3_vl")
    model, inputs = pair.model, pair.cases["video"]
    t, h, w = inputs.video_grid_thw[0].tolist()
    text = model.tokenizer.decode(inputs.input_ids[0])
    assert text.count("seconds") == t == 2, "one timestamp per temporal patch"
    cells = model.image_token_cells(inputs, None)
    assert len(cells) == int(model.image_token_mask(inputs.input_ids).sum())
    assert [c["t"] for c in cells if c["kind"] == "video"] == [0] * (h * w // 4) + [1] * (h * w // 4)


def test_rope_index_is_hfs_for_padded_images_and_timestamped_videos(loaded):
    pair = loaded("qwen3_vl")
    for case in ("batch", "video"):
        inputs = pair.cases[case]
        kwargs = dict(mm_token_type_ids=inputs.mm_token_type_ids, image_grid_thw=inputs.image_grid_thw,
                      video_grid_thw=inputs.video_grid_thw, attention_mask=inputs.attention_mask)
        expected, _ = pair.hf.model.get_rope_index(inputs.input_ids, **kwargs)
        positions = pair.model.rope_index(inputs, inputs.attention_mask)
        real = inputs.attention_mask.bool()
        assert torch.equal(positions[:, real], expected[:, real]), case


def test_bad_video_and_type_ids_are_refused(loaded):
    pair = loaded("qwen3_vl")
    model, inputs = pair.model, pair.cases["video"]
    t, h, w = inputs.video_grid_thw[0].tolist()
    one_run = dataclasses.replace(inputs, video_grid_thw=torch.tensor([[1, h * t, w]]))  # frames as one tall frame
    with pytest.raises(ValueError, match="runs of"):
        model(one_run)
    short = dataclasses.replace(inputs, pixel_values_videos=inputs.pixel_values_videos[:-4])
    with pytest.raises(ValueError, match="implies"):
        model(short)
    types = inputs.mm_token_type_ids.clone()
    types[types == 2] = 1  # video placeholders marked as image tokens
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(dataclasses.replace(inputs, mm_token_type_ids=types))
    with torch.no_grad():  # HF needs them; here they follow from the placeholders, as the processor writes them
        assert torch.equal(model(dataclasses.replace(inputs, mm_token_type_ids=None)), model(inputs))


# ------------------------------------------------------------------------------- random small configurations


def draw(seed: int, moe: bool):
    rng = random.Random(seed)
    n_layers = rng.choice([3, 4])
    deepstack = sorted(rng.sample(range(3), rng.choice([2, 3])))[: n_layers - 1]
    heads = rng.choice([2, 4])
    head_dim = rng.choice([8, 12, 16])
    half = head_dim // 2
    h = rng.randint(1, (half - 1) // 2)
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=heads,
                num_key_value_heads=rng.choice([1, heads]), head_dim=head_dim, max_position_embeddings=256,
                attention_bias=rng.random() < 0.3,
                rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[half - 2 * h, h, h],
                                     mrope_interleaved=True))
    if moe:
        text.update(num_experts=rng.choice([3, 5]), num_experts_per_tok=2, moe_intermediate_size=16,
                    decoder_sparse_step=rng.choice([1, 2]), mlp_only_layers=rng.choice([[], [0]]))
    vision = dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=rng.choice([9, 16, 25]),
                  deepstack_visual_indexes=deepstack)
    config_class, model_class = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    config = config_class(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                          vision_start_token_id=292, vision_end_token_id=293, tie_word_embeddings=rng.random() < 0.5)
    torch.manual_seed(seed)
    hf = model_class(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return hf


@pytest.mark.parametrize("seed, moe", [(0, False), (1, True), (2, False), (3, True)])
def test_random_configurations_match_hf(seed, moe):
    hf = draw(seed, moe)
    model = quiet(HookedVLM.from_hf_model, hf)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4]])
    counts = (grids.prod(-1) // 4).tolist()
    frame = [292, *[291] * 4, 293]  # each temporal patch of the 2 x 4 x 4 video, after its timestamp tokens (9, 10)
    ids = torch.tensor([[5, 292, *[290] * counts[0], 293, 6, 9, 10, *frame, 7, 292, *[290] * counts[1], 293, 9, 11, *frame, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=grids,
                  pixel_values_videos=torch.randn(32, 3 * 2 * 4 * 4), video_grid_thw=torch.tensor([[2, 4, 4]]),
                  mm_token_type_ids=(ids == 290).int() + 2 * (ids == 291).int())
    with torch.no_grad():
        reference = hf(**kwargs, output_hidden_states=True)
        logits, cache = model.run_with_cache(VLMInputs(**kwargs))
    assert max_diff(logits, reference.logits) <= ATOL
    for i in range(model.cfg.n_layers - 1):  # HF's last hidden state is after the final norm
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], reference.hidden_states[i + 1]) <= ATOL, i
    assert model.cfg.deepstack_layers == len(hf.config.vision_config.deepstack_visual_indexes) >= 2
    stack = cache.decompose_resid()
    assert max_diff(stack.sum(0), cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]) <= 1e-5
