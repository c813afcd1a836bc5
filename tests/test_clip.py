"""HookedCLIP (CLIP, SigLIP dual encoders) against HF: every hidden state of both towers, the embeddings and
logits_per_image in fp32, half precision bit for bit, head ablation = HF surgery, TL tools on tower views, weight
processing, the spatial index and bad input. Fixtures: tiny saved checkpoints loaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import ATOL, quiet
from dual_encoder_checks import (
    TEXTS, assert_half_precision_is_hf_bit_for_bit, assert_head_ablation_equals_hf_surgery, assert_hidden_states_match,
)
from transformer_lens import patching
from transformers import AutoModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from tl_vlm import HookedCLIP
from tl_vlm.zoo.data import make_examples
from tl_vlm.zoo.tiny_clip import build_tiny_clip

VARIANTS = ("clip", "siglip")


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual")
    loaded = {}

    def get(variant: str, dtype=torch.float32):
        if (variant, dtype) not in loaded:
            path = build_tiny_clip(root / variant, variant)
            hf = quiet(AutoModel.from_pretrained, path, dtype=dtype).eval()
            model = quiet(HookedCLIP.from_pretrained, path, dtype=dtype)
            loaded[variant, dtype] = hf, model, path
        return loaded[variant, dtype]

    return get


def _inputs(model, texts=TEXTS, n_images=3, **kwargs):
    return model.prepare(images=[e.image for e in make_examples(n_images, 0)], text=texts, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padding", ["default", "longest"])
def test_every_hidden_state_and_embedding_matches_hf(dual, variant, padding):
    hf, model, _ = dual(variant)
    kwargs = {} if padding == "default" else {"padding": True}
    inputs = _inputs(model, **kwargs)
    assert inputs.attention_mask is not None and not bool(inputs.attention_mask.all())  # padded rows are exercised
    with torch.no_grad():
        ref = hf(**inputs.as_kwargs(), output_hidden_states=True)
        logits, cache = model.run_with_cache(inputs)
        image = hf.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        text = hf.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
    assert logits.shape == (3, 3)
    assert (logits - ref.logits_per_image).abs().max() <= ATOL
    assert (model.encode_image(inputs.pixel_values) - image).abs().max() <= ATOL
    assert (model.encode_text(inputs.input_ids, inputs.attention_mask) - text).abs().max() <= ATOL
    assert (cache["vision.hook_embed_out"] - image).abs().max() <= ATOL
    assert (cache["text.hook_embed_out"] - text).abs().max() <= ATOL
    assert_hidden_states_match(cache, model, ref)
    # the text tower's final norm is HF's last_hidden_state; the pooled position is HF's pooler input
    assert (cache["text.ln_final.hook_normalized"] * model.text.ln_final.w + model.text.ln_final.b
            - ref.text_model_output.last_hidden_state).abs().max() <= ATOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_hf_bit_for_bit_and_caching_changes_nothing(dual, variant, dtype):
    hf, model, _ = dual(variant, dtype)
    inputs = _inputs(model).as_kwargs()
    assert_half_precision_is_hf_bit_for_bit(hf, model, inputs, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_head_ablation_equals_hf_surgery(dual, variant, tower):
    _, model, path = dual(variant)
    assert_head_ablation_equals_hf_surgery(model, path, _inputs(model), tower)


def test_clip_text_tower_is_causal_and_siglip_bidirectional(dual):
    for variant, causal in (("clip", True), ("siglip", False)):
        _, model, _ = dual(variant)
        _, cache = model.run_with_cache(_inputs(model), names_filter=lambda n: n == "text.blocks.0.attn.hook_pattern")
        pattern = cache["text.blocks.0.attn.hook_pattern"][1]  # the unpadded longest text
        upper = pattern.triu(1)
        assert (upper.abs().max() == 0) == causal, variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_tl_patching_on_tower_views(dual, variant):
    _, model, _ = dual(variant)
    clean = _inputs(model, texts=["a red bar", "a blue bar"], n_images=2)
    corrupt = _inputs(model, texts=["a green bar", "a blue bar"], n_images=2)

    def metric(logits):
        return logits[0, 0]

    text = model.tower("text")
    _, cache = text.run_with_cache(clean)
    corrupt_t = text.inputs(corrupt)
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(text, corrupt_t, cache, metric)
        clean_metric, corrupt_metric = metric(model(clean)), metric(model(corrupt))
    assert result.shape == (text.cfg.n_layers, clean.input_ids.shape[1])
    colour = int((clean.input_ids[0] != corrupt.input_ids[0]).nonzero()[0, 0])
    # before layer 0 the texts differ only at the colour word: patching it restores the clean score exactly
    assert torch.allclose(result[0, colour], clean_metric, atol=1e-5)
    others = [p for p in range(result.shape[1]) if p != colour]
    assert torch.allclose(result[0, others], corrupt_metric.expand(len(others)), atol=1e-5)
    # the vision tower: the view's hook_embed is the stream entering block 0, decompositions are exact
    vision = model.tower("vision")
    _, vcache = vision.run_with_cache(clean)
    corrupt_v = vision.inputs(corrupt)
    with torch.no_grad():
        vresult = patching.get_act_patch_resid_pre(vision, corrupt_v, vcache, metric)
    assert vresult.shape == (vision.cfg.n_layers, model.vlm_cfg.vision.n_ctx)
    n = vision.cfg.n_layers
    assert (vcache.decompose_resid(layer=n).sum(0) - vcache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() <= 1e-5
    _, tcache = text.run_with_cache(clean)
    assert (tcache.decompose_resid(layer=n).sum(0) - tcache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_processing_keeps_logits(dual, variant):
    _, model, path = dual(variant)
    inputs = _inputs(model)
    processed = quiet(HookedCLIP.from_pretrained, path, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    with torch.no_grad():
        assert (processed(inputs) - model(inputs)).abs().max() <= ATOL
    assert processed.text.blocks[0].ln1.w is None and processed.vision.blocks[0].ln2.w is None
    assert processed.text.blocks[0].attn.b_V.abs().max() == 0


def test_spatial_index_covers_every_vision_position(dual):
    for variant in VARIANTS:
        _, model, _ = dual(variant)
        inputs = _inputs(model, n_images=2)
        cells = model.image_token_cells(inputs, [(64, 64), (64, 64)])
        cfg = model.vlm_cfg.vision
        assert len(cells) == 2 * cfg.n_ctx
        assert [c["kind"] for c in cells[: cfg.n_ctx]].count("cls") == int(cfg.class_token)
        last = cells[cfg.n_ctx - 1]
        assert (last["row"], last["col"]) == (cfg.grid - 1, cfg.grid - 1) and last["x1"] == pytest.approx(64.0)


def test_bad_input_gets_clear_errors(dual):
    _, model, _ = dual("clip")
    inputs = _inputs(model)
    n_ctx = model.vlm_cfg.text.n_ctx
    long = " ".join(["red"] * (n_ctx + 4))
    with pytest.raises(ValueError, match=rf"{n_ctx} positions.*truncation=True"):
        model(_inputs(model, texts=[long], n_images=1))
    truncated = _inputs(model, texts=[long], n_images=1, truncation=True, max_length=n_ctx)
    assert model(truncated).shape == (1, 1)  # HF's processor truncation keeps the end-of-text token
    size = model.vlm_cfg.vision.image_size
    with pytest.raises(ValueError, match=rf"{size}, {size}"):
        model(input_ids=inputs.input_ids, pixel_values=torch.zeros(1, 3, size + 2, size + 2))
    with pytest.raises(ValueError, match="both input_ids and pixel_values"):
        model(input_ids=inputs.input_ids)
    with pytest.raises(ValueError, match="end-of-text"):
        model.encode_text(inputs.input_ids[:, :2])
    with pytest.raises(ValueError, match="refusing to drop"):
        model(inputs.as_kwargs() | {"image_sizes": torch.tensor([[30, 30]])})
    with pytest.raises(ValueError, match="vocabulary"):
        model.encode_text(inputs.input_ids + 10_000)


def _random_dual(kind: str, seed: int, legacy_eos: bool):
    g = torch.Generator().manual_seed(seed)
    heads = [2, 4][int(torch.randint(2, (1,), generator=g))]
    d_text, d_vision = heads * int(torch.randint(3, 7, (1,), generator=g)), heads * int(torch.randint(3, 7, (1,), generator=g))
    text = dict(vocab_size=50, hidden_size=d_text, intermediate_size=2 * d_text, num_hidden_layers=2,
                num_attention_heads=heads, max_position_embeddings=12, eos_token_id=2 if legacy_eos else 7)
    vision = dict(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=2, num_attention_heads=heads,
                  image_size=12, patch_size=4)
    torch.manual_seed(seed)
    if kind == "clip":
        hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    else:
        hf = SiglipModel(SiglipConfig(text_config={**text, "projection_size": d_vision}, vision_config=vision))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim <= 1:
                p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


@pytest.mark.parametrize("kind, seed, legacy_eos", [("clip", 1, True), ("clip", 2, False), ("siglip", 3, False)])
def test_random_configs_match_hf(kind, seed, legacy_eos):
    hf = _random_dual(kind, seed, legacy_eos)
    model = HookedCLIP.from_hf_model(hf)
    ids = torch.randint(8, 50, (3, 9))
    ids[0, 5], ids[1, 8], ids[2, 3] = 7, 7, 7  # an end-of-text token (id 7) in every row, at different places
    pixels = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels)
        assert (model(input_ids=ids, pixel_values=pixels) - ref.logits_per_image).abs().max() <= ATOL
    assert model.text.embed.W_E.data_ptr() == hf.text_model.embeddings.token_embedding.weight.data_ptr()


def test_hooked_vlm_points_dual_encoders_to_hooked_clip(dual):
    from tl_vlm import HookedVLM

    _, _, path = dual("clip")
    with pytest.raises(NotImplementedError, match="HookedCLIP"):
        quiet(HookedVLM.from_pretrained, path)


def test_hook_points_are_modules_and_gradients_flow(dual):
    _, model, _ = dual("clip")
    inputs = _inputs(model)
    with torch.no_grad():
        plain = model(inputs)

    class Zero(torch.nn.Module):  # what SAELens does: a module in the hook point's slot
        def forward(self, x):
            return torch.zeros_like(x)

    block = model.text.blocks[1]
    original = block.hook_attn_out
    block.hook_attn_out = Zero()
    try:
        with torch.no_grad():
            swapped = model(inputs)
            ref = model.run_with_hooks(inputs, fwd_hooks=[("text.blocks.1.hook_attn_out", lambda x, hook: x * 0)])
    finally:
        block.hook_attn_out = original
    assert (swapped - ref).abs().max() <= 1e-6 and (swapped - plain).abs().max() > 1e-3
    fired = []
    handle = model.vision.blocks[0].register_forward_hook(lambda m, i, o: fired.append(o.shape))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    assert fired == [torch.Size([3, model.vlm_cfg.vision.n_ctx, model.vlm_cfg.vision.d_model])]
    logits = model(inputs)
    logits[0, 0].backward()
    assert model.vision.blocks[0].attn.W_Q.grad is not None and model.text.embed.W_E.grad is not None
    model.zero_grad(set_to_none=True)
