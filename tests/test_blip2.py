"""BLIP-2 / InstructBLIP against HF, fp32: tiny checkpoints saved and reloaded through from_pretrained."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Blip2ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
)

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.families.blip2 import cross_attention_layers, query_patch_attention, query_positions
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_blip2 import NUM_QUERY_TOKENS, VARIANTS, build_tiny_blip2

ATOL = 1e-4
PROMPTS = ["Question: what is the colour? Answer:", "Question: describe the shape in the image please. Answer:"]
DECODER_IDS = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])  # column 0 is replaced by the decoder start token


def hf_class(variant: str):
    return InstructBlipForConditionalGeneration if variant.startswith("instructblip") else Blip2ForConditionalGeneration


class Pair:
    """HF reference and HookedVLM from one saved checkpoint. ``batch`` is the processor's output (what
    generate takes); ``inputs`` adds decoder_input_ids for Flan-T5, whose forward needs them."""

    def __init__(self, variant: str, path):
        self.variant, self.path = variant, path
        self.t5 = variant.endswith("flan_t5")
        self.hf = hf_class(variant).from_pretrained(path).eval()
        self.model = HookedVLM.from_pretrained(path)
        self.batch = self.model.prepare(images=sample_images(2, seed=3), text=PROMPTS)
        self.inputs = self.batch
        self.real = self.batch.attention_mask.bool()  # real prompt positions
        self.out_mask = self.real  # real positions of the logits
        if self.t5:
            decoder_ids = DECODER_IDS.clone()
            decoder_ids[:, 0] = self.hf.config.text_config.decoder_start_token_id
            self.inputs = dataclasses.replace(self.batch, decoder_input_ids=decoder_ids)
            self.out_mask = None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_blip2")
    return {variant: build_tiny_blip2(root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def pairs(checkpoints):
    loaded: dict[str, Pair] = {}

    def get(variant: str) -> Pair:
        if variant not in loaded:
            loaded[variant] = Pair(variant, checkpoints[variant])
        return loaded[variant]

    return get


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, pairs) -> Pair:
    return pairs(request.param)


@pytest.fixture(scope="module")
def opt(pairs) -> Pair:
    return pairs("blip2_opt")


def hf_hidden_states(hf, batch: VLMInputs) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Logits and every layer output of one HF forward pass (forward hooks on its layers)."""
    lm = hf.language_model
    layers = {
        "vision": hf.vision_model.encoder.layers,
        "vision_post": [hf.vision_model.post_layernorm],
        "qformer": hf.qformer.encoder.layer,
    }
    if hasattr(lm, "encoder"):  # T5
        layers.update(encoder=lm.encoder.block, decoder=lm.decoder.block)
    else:
        layers["language"] = lm.model.decoder.layers if hasattr(lm.model, "decoder") else lm.model.layers
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o[0] if isinstance(o, tuple) else o))
        for name, modules in layers.items()
        for layer in modules
    ]
    try:
        with torch.no_grad():
            logits = hf(**batch.as_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    outputs["vision_post"] = outputs["vision_post"][:1]  # HF applies it again to the pooled class token
    return logits, outputs


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[mask] if mask is not None else diff).max().item()


def test_logits_and_every_hidden_state_match_hf(pair):
    model, batch = pair.model, pair.inputs
    assert pair.real.sum() < pair.real.numel(), "the batch must be padded"
    hf_logits, hf = hf_hidden_states(pair.hf, batch)
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch)
    assert max_diff(logits, hf_logits, pair.out_mask) <= ATOL
    assert len(hf["vision"]) == model.vision.cfg.n_layers and len(hf["qformer"]) == model.qformer.cfg.n_layers
    for i, hidden in enumerate(hf["vision"]):
        assert max_diff(cache[f"vision.blocks.{i}.hook_resid_post"], hidden) <= ATOL, f"vision layer {i}"
    post = cache["vision.ln_post.hook_normalized"] * model.vision.ln_post.w + model.vision.ln_post.b
    assert max_diff(post, hf["vision_post"][0]) <= ATOL
    for i, hidden in enumerate(hf["qformer"]):  # InstructBLIP: the instruction positions too
        assert max_diff(cache[f"qformer.blocks.{i}.hook_normalized_resid_post"], hidden) <= ATOL, f"qformer layer {i}"
    if pair.t5:
        assert len(hf["encoder"]) == model.encoder.cfg.n_layers and len(hf["decoder"]) == model.decoder.cfg.n_layers
        for i, hidden in enumerate(hf["encoder"]):
            assert max_diff(cache[f"encoder.blocks.{i}.hook_resid_post"], hidden, pair.real) <= ATOL, f"encoder layer {i}"
        for i, hidden in enumerate(hf["decoder"]):
            assert max_diff(cache[f"decoder.blocks.{i}.hook_resid_post"], hidden) <= ATOL, f"decoder layer {i}"
    else:
        assert len(hf["language"]) == model.cfg.n_layers
        for i, hidden in enumerate(hf["language"]):
            assert max_diff(cache[f"blocks.{i}.hook_resid_post"], hidden, pair.real) <= ATOL, f"language layer {i}"


def test_greedy_generate_equals_hf(pair):
    with torch.no_grad():
        expected = pair.hf.generate(**pair.batch.as_kwargs(), max_new_tokens=8, do_sample=False)
    assert torch.equal(pair.model.generate(pair.batch, max_new_tokens=8), expected)
    assert torch.equal(pair.model.generate(pair.batch, max_new_tokens=8, use_past_kv_cache=False), expected)


def test_cross_attention_head_ablation_equals_hf_surgery(pair):
    model, batch = pair.model, pair.inputs
    layer, head = cross_attention_layers(model)[-1], 1
    d_head = model.qformer.cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        clean = model(batch)
        ablated = model.run_with_hooks(batch, fwd_hooks=[(f"qformer.blocks.{layer}.cross_attn.hook_z", ablate)])
        dense = pair.hf.qformer.encoder.layer[layer].crossattention.output.dense
        saved = dense.weight[:, head * d_head : (head + 1) * d_head].clone()
        dense.weight[:, head * d_head : (head + 1) * d_head] = 0.0
        try:
            surgery = pair.hf(**batch.as_kwargs()).logits
        finally:
            dense.weight[:, head * d_head : (head + 1) * d_head] = saved
    assert max_diff(ablated, clean, pair.out_mask) > 1e-3, "ablating a cross-attention head must change the output"
    assert max_diff(ablated, surgery, pair.out_mask) <= ATOL


def test_explicit_attention_matches_sdpa_and_patterns_read_patches(pair):
    model, batch = pair.model, pair.inputs
    with torch.no_grad():
        fast = model(batch)
        explicit, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    assert max_diff(fast, explicit, pair.out_mask) <= ATOL
    n_patch = (model.vlm_cfg.image_size // model.vlm_cfg.patch_size) ** 2 + 1
    qcfg = model.qformer.cfg
    for i in cross_attention_layers(model):
        pattern = cache[f"qformer.blocks.{i}.cross_attn.hook_pattern"]
        assert pattern.shape == (2, qcfg.n_heads, NUM_QUERY_TOKENS, n_patch)  # [batch, head, query, patch]
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    maps = query_patch_attention(model, cache)
    grid = model.vlm_cfg.image_size // model.vlm_cfg.patch_size
    assert maps.shape == (len(cross_attention_layers(model)), 2, qcfg.n_heads, NUM_QUERY_TOKENS, grid, grid)
    first = cache[f"qformer.blocks.{cross_attention_layers(model)[0]}.cross_attn.hook_pattern"]
    assert torch.equal(maps[0].flatten(-2), first[..., 1:]), "patch grid is row-major after the class token"


def test_hook_names_and_every_hook_fires(pair):
    model, batch = pair.model, pair.inputs
    names = set(model.hook_dict)
    qcfg = model.qformer.cfg
    for i in range(qcfg.n_layers):
        for hook in ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
                     "hook_normalized_resid_post", "ln1.hook_scale", "ln2.hook_normalized",
                     "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "attn.hook_result",
                     "mlp.hook_pre", "mlp.hook_post"]:
            assert f"qformer.blocks.{i}.{hook}" in names
        cross = [f"qformer.blocks.{i}.cross_attn.hook_{h}" for h in ("q", "k", "v", "z", "pattern", "result")]
        assert all(name in names for name in cross) == (i % 2 == 0), "cross-attention every 2nd layer"
    expected = ["qformer.hook_query_embed", "qformer.ln_embed.hook_scale", "vision.hook_embed", "vision.hook_pos_embed",
                "vision.ln_post.hook_normalized", "projector.hook_in", "projector.hook_out", "hook_embed",
                "hook_image_embed", "hook_text_embed"]
    if pair.variant.startswith("instructblip"):
        expected += ["qformer.hook_text_embed", "qformer.hook_pos_embed", "qformer.blocks.0.mlp_text.hook_pre"]
    if pair.t5:
        for i in range(model.decoder.cfg.n_layers):
            expected += [f"decoder.blocks.{i}.{h}" for h in (
                "hook_resid_pre", "hook_resid_mid", "hook_cross_attn_out", "hook_resid_mid_cross", "hook_resid_post",
                "ln1.hook_scale", "ln2.hook_scale", "ln3.hook_scale", "attn.hook_pattern", "cross_attn.hook_q",
                "cross_attn.hook_k", "cross_attn.hook_v", "cross_attn.hook_z", "cross_attn.hook_pattern",
                "cross_attn.hook_result", "mlp.hook_pre", "mlp.hook_pre_linear")]
        expected += [f"encoder.blocks.{i}.attn.hook_{h}" for i in range(model.encoder.cfg.n_layers) for h in "qkvz"]
        expected += ["encoder.hook_rel_pos_bias", "decoder.hook_rel_pos_bias", "decoder.hook_embed",
                     "encoder.ln_final.hook_scale", "decoder.ln_final.hook_normalized"]
        assert not any(name.startswith("blocks.") for name in names), "T5 blocks live under encoder./decoder."
    else:
        expected += ["blocks.0.attn.hook_pattern", "ln_final.hook_scale"]
        expected += ["hook_pos_embed"] if pair.variant == "blip2_opt" else ["blocks.0.attn.hook_rot_q"]
    assert set(expected) <= names
    assert "vision.ln_pre.hook_scale" not in names, "BLIP-2's ViT has no pre-LN"
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(batch)
    finally:
        model.set_use_attn_result(False)
    assert set(cache.keys()) == names, "a registered hook point that never fires is a silent no-op"
    n_patch = (model.vlm_cfg.image_size // model.vlm_cfg.patch_size) ** 2 + 1
    assert cache["qformer.blocks.0.cross_attn.hook_k"].shape[:2] == (2, n_patch), "keys and values read the patches"


def test_query_positions_hold_the_projected_queries(pair):
    model, batch = pair.model, pair.inputs
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in ("hook_embed", "projector.hook_out"))
    positions = query_positions(model, batch.input_ids)
    assert positions.shape == (2, NUM_QUERY_TOKENS)
    rows = torch.arange(2)[:, None]
    assert torch.equal(cache["hook_embed"][rows, positions], cache["projector.hook_out"])


@pytest.mark.parametrize("variant", ["blip2_opt", "blip2_flan_t5"])
def test_legacy_config_prepends_the_queries(tmp_path, checkpoints, pairs, variant):
    """A config without an image token id runs the legacy form: queries prepended to the text embeddings."""
    reference = pairs(variant)
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoints[variant], legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["image_token_index"]
    (legacy / "config.json").write_text(json.dumps(config))
    model = HookedVLM.from_pretrained(legacy)
    assert model.vlm_cfg.image_token_id is None
    batch = reference.batch
    # The processor puts the placeholders first in every row; the legacy prompt is the rest.
    assert bool((batch.input_ids[:, :NUM_QUERY_TOKENS] == reference.model.vlm_cfg.image_token_id).all())
    text = dataclasses.replace(
        reference.inputs,
        input_ids=batch.input_ids[:, NUM_QUERY_TOKENS:],
        attention_mask=batch.attention_mask[:, NUM_QUERY_TOKENS:],
    )
    with torch.no_grad():
        logits = model(text)
        expected = reference.hf(**reference.inputs.as_kwargs()).logits
    # Decoder-only: logits cover the prepended queries, as HF's legacy form returned them.
    assert logits.shape == expected.shape
    assert max_diff(logits, expected, reference.out_mask) <= ATOL
    assert torch.equal(query_positions(model, text.input_ids), torch.arange(NUM_QUERY_TOKENS).expand(2, -1))
    prompt = dataclasses.replace(text, decoder_input_ids=None)
    expected_tokens = reference.model.generate(batch, max_new_tokens=6)
    for use_cache in (True, False):
        tokens = model.generate(prompt, max_new_tokens=6, use_past_kv_cache=use_cache)
        if reference.t5:  # the decoder's tokens
            assert torch.equal(tokens, expected_tokens)
        else:  # the text prompt, then the same new tokens
            assert torch.equal(tokens[:, text.shape[1] :], expected_tokens[:, batch.shape[1] :])


def test_weight_processing_keeps_probabilities(opt):
    processed = HookedVLM.from_pretrained(
        opt.path, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    assert processed.cfg.normalization_type == "LNPre" and processed.vision.blocks[0].ln1.w is None
    assert processed.pos_embed.W_pos.mean(-1).abs().max() < 1e-6, "learned positions are centred like TL's"
    with torch.no_grad():
        expected = opt.hf(**opt.batch.as_kwargs()).logits.softmax(-1)
        probs = processed(opt.batch).softmax(-1)
    assert max_diff(probs, expected, opt.real) <= ATOL


def test_placeholder_count_mismatch_is_an_error(opt):
    batch = opt.batch
    ids = batch.input_ids.clone()
    ids[0, 0] = opt.model.tokenizer.bos_token_id  # one query placeholder short in row 0
    with pytest.raises(ValueError, match="num_query_tokens"):
        opt.model(VLMInputs(ids, batch.pixel_values, batch.attention_mask))
    with pytest.raises(ValueError, match="no pixel_values"):
        opt.model(batch.input_ids, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="refusing to drop"):
        opt.model({**batch.as_kwargs(), "qformer_input_ids": batch.input_ids})
    with pytest.raises(ValueError, match="decoder-only"):
        opt.model(batch, decoder_input_ids=DECODER_IDS)


def test_flan_t5_needs_decoder_ids_and_has_no_weight_processing(pairs):
    t5 = pairs("blip2_flan_t5")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5.model(t5.batch)
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        HookedVLM.from_pretrained(t5.path, fold_ln=True)


def test_query_count_is_read_from_the_config(checkpoints, opt):
    """Nothing assumes 32 (or 8) queries: a 3-query model converts and matches HF."""
    config = AutoConfig.from_pretrained(checkpoints["blip2_opt"])
    config.num_query_tokens = 3
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.query_tokens.normal_()
    model = HookedVLM.from_hf_model(hf)
    token = config.image_token_index
    ids = torch.tensor([[token] * 3 + [1, 9, 16, 39]])
    pixels = opt.batch.pixel_values[:1]
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        assert max_diff(model(VLMInputs(ids, pixels)), expected) <= ATOL
    assert query_positions(model, ids).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_hf_dtypes_and_numbers(checkpoints, variant, dtype):
    """Loaded in float16, HF keeps BLIP-2's Q-Former and Flan-T5's ``wo`` in float32 (``_keep_in_fp32_modules``,
    whose "wo" also catches InstructBLIP's Q-Former word embeddings); tl_vlm does the same, through both loaders,
    so half-precision runs give HF's numbers rather than merely close ones."""
    path = checkpoints[variant]
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    loaded, shared = HookedVLM.from_pretrained(path, dtype=dtype), HookedVLM.from_hf_model(hf)
    assert loaded.qformer.blocks[0].attn.W_Q.dtype == hf.qformer.encoder.layer[0].attention.attention.query.weight.dtype
    assert loaded.vision.embed.W_patch.dtype == dtype and loaded.projector.W.dtype == dtype
    inputs = loaded.prepare(images=sample_images(2, seed=1), text=["What colour?", "Which shape?"])
    if "t5" in variant:
        wo = hf.language_model.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype
        assert loaded.encoder.blocks[0].mlp.W_out.dtype == wo == (torch.float32 if dtype == torch.float16 else dtype)
        decoder_ids = DECODER_IDS.clone()
        decoder_ids[:, 0] = hf.config.text_config.decoder_start_token_id
        inputs = dataclasses.replace(inputs, decoder_input_ids=decoder_ids)
    with torch.no_grad():
        reference = hf(**inputs.as_kwargs()).logits.float()
        for model in (loaded, shared):
            assert (model(inputs).float() - reference).abs().max().item() <= 1e-4
