"""BLIP-2 / InstructBLIP-only behaviour (the shared contract is tests/conformance): the vision tower's post-LN,
cross-attention patterns over the patch grid, query positions, the legacy prepended form, the query count,
Flan-T5's decoder ids, and the query spatial index."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conformance.registry import ATOL, logits_mask, max_diff, params
from conformance.registry import T5_DECODER_IDS as DECODER_IDS
from transformers import AutoConfig, Blip2ForConditionalGeneration

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.families.blip2 import cross_attention_layers, query_patch_attention, query_positions
from tl_vlm.zoo.tiny_blip2 import NUM_QUERY_TOKENS, VARIANTS

BLIP2 = [p for p in params() if p.values[0] in VARIANTS]


class Pair:
    """The registry entry, with the names the tests below were written with."""

    def __init__(self, loaded):
        self.path, self.hf, self.model, self.variant = loaded.path, loaded.hf, loaded.model, loaded.name
        self.t5 = loaded.model.capabilities.encoder_decoder
        self.inputs = loaded.batch()  # with decoder ids for Flan-T5
        self.batch = dataclasses.replace(self.inputs, decoder_input_ids=None)  # what generate takes
        self.real = self.batch.attention_mask.bool()
        self.out_mask = logits_mask(self.model, self.inputs)


@pytest.fixture(scope="session")
def pairs(loaded):
    return lambda variant: Pair(loaded(variant))


@pytest.fixture(params=BLIP2)
def pair(request, pairs) -> Pair:
    return pairs(request.param)


@pytest.fixture
def opt(pairs) -> Pair:
    return pairs("blip2_opt")


def test_vision_post_layernorm_matches_hf(pair):
    """HF applies the post-LN to the whole last hidden state (and again to the pooled class token)."""
    seen = []
    handle = pair.hf.vision_model.post_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            pair.hf(**pair.inputs.as_kwargs())
            _, cache = pair.model.run_with_cache(pair.inputs, names_filter="vision.ln_post.hook_normalized")
    finally:
        handle.remove()
    ln = pair.model.vision.ln_post
    assert max_diff(cache["vision.ln_post.hook_normalized"] * ln.w + ln.b, seen[0]) <= ATOL


def test_cross_attention_patterns_read_the_patch_grid(pair):
    model, batch = pair.model, pair.inputs
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("qformer.") and "cross_attn" in n)
    n_patch = (model.vlm_cfg.image_size // model.vlm_cfg.patch_size) ** 2 + 1
    qcfg = model.qformer.cfg
    assert cache["qformer.blocks.0.cross_attn.hook_k"].shape[:2] == (2, n_patch), "keys and values read the patches"
    for i in cross_attention_layers(model):
        pattern = cache[f"qformer.blocks.{i}.cross_attn.hook_pattern"]
        assert pattern.shape == (2, qcfg.n_heads, NUM_QUERY_TOKENS, n_patch)  # [batch, head, query, patch]
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    maps = query_patch_attention(model, cache)
    grid = model.vlm_cfg.image_size // model.vlm_cfg.patch_size
    assert maps.shape == (len(cross_attention_layers(model)), 2, qcfg.n_heads, NUM_QUERY_TOKENS, grid, grid)
    first = cache[f"qformer.blocks.{cross_attention_layers(model)[0]}.cross_attn.hook_pattern"]
    assert torch.equal(maps[0].flatten(-2), first[..., 1:]), "patch grid is row-major after the class token"


def test_query_positions_hold_the_projected_queries(pair):
    model, batch = pair.model, pair.inputs
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in ("hook_embed", "projector.hook_out"))
    positions = query_positions(model, batch.input_ids)
    assert positions.shape == (2, NUM_QUERY_TOKENS)
    rows = torch.arange(2)[:, None]
    assert torch.equal(cache["hook_embed"][rows, positions], cache["projector.hook_out"])
    index = spatial_index(model, pair.batch)
    assert set(index["kind"]) == {"query"} and len(index) == 2 * model.qformer.n_query


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


def test_learned_positions_are_centred_by_weight_processing(opt):
    processed = HookedVLM.from_pretrained(opt.path, fold_ln=True, center_writing_weights=True)
    assert processed.cfg.normalization_type == "LNPre"
    assert processed.pos_embed.W_pos.mean(-1).abs().max() < 1e-6, "learned positions are centred like TL's"


def test_decoder_only_refuses_decoder_ids(opt):
    with pytest.raises(ValueError, match="decoder-only"):
        opt.model(opt.batch, decoder_input_ids=DECODER_IDS)


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
