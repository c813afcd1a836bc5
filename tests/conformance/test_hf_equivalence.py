"""Every registry entry against HF, from the same saved checkpoint: fp32 max abs diff <= 1e-4, half precision
equal to HF's, generation token for token, head ablation by hooks equal to HF module surgery."""

from __future__ import annotations

import re

import pytest
import torch

from conformance.registry import (
    ATOL,
    HalfPrecision,
    assert_hidden_states_match,
    attention_layers,
    generation_inputs,
    hf_run,
    logits_mask,
    max_diff,
    not_applicable,
    params,
    quiet,
    tower_of,
)
from tl_vlm import HookedVLM

IMAGE_CASES = ("batch", "video", "multi_image", "video_and_image")  # generation cases (text-only and right padding: forward only)


@pytest.mark.parametrize("name, case", params(lambda e: e.cases))
def test_logits_and_every_hidden_state_match_hf(loaded, name, case):
    pair = loaded(name)
    model, inputs = pair.model, pair.cases[case]
    if case.startswith("batch"):
        assert not bool(inputs.attention_mask.all()), "the batch must actually be padded"
    hf_logits, hf = hf_run(pair.entry, pair.hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    assert max_diff(logits, hf_logits, logits_mask(model, inputs)) <= ATOL
    towers = set(pair.entry.towers) if case != "text" else {"language"}
    assert set(hf) == towers, "every tower is compared"
    assert_hidden_states_match(model, cache, hf, inputs)
    if case == "text":
        assert not any(n.startswith("vision.") for n in cache.keys()), "a text-only prompt never runs the vision tower"


@pytest.mark.parametrize("name", params())
def test_from_hf_model_shares_weights_and_matches(loaded, name):
    pair = loaded(name)
    hf_storages = {p.untyped_storage().data_ptr() for p in pair.hf.parameters()}
    model = quiet(HookedVLM.from_hf_model, pair.hf, pair.model.processor)
    computed = model.computed_parameters
    copied = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in hf_storages
              and not (computed and re.fullmatch(computed, n))]
    assert not copied, f"conversion must not copy the weights: {copied[:5]}"
    with torch.no_grad():
        assert max_diff(model(pair.batch()), pair.model(pair.batch())) == 0.0, "from_hf_model equals from_pretrained"
    if pair.model.capabilities.encoder_decoder or pair.model.capabilities.cross_attention:
        return  # weight processing of an encoder-decoder or cross-attention LM is refused (test_blip2, test_mllama)
    before = {n: p.detach().clone() for n, p in pair.hf.named_parameters()}
    processed = quiet(HookedVLM.from_hf_model, pair.hf, pair.model.processor, fold_ln=True)
    assert processed.blocks[0].attn.W_Q.data_ptr() != model.blocks[0].attn.W_Q.data_ptr()
    for n, p in pair.hf.named_parameters():
        assert torch.equal(p, before[n]), f"processing wrote into the HF model's {n}"


@pytest.mark.parametrize("name", params())
def test_weight_processing_keeps_probabilities(loaded, name):
    pair = loaded(name)
    not_applicable(pair.entry, "test_weight_processing_keeps_probabilities")
    if pair.model.capabilities.encoder_decoder:
        pytest.skip("capabilities.encoder_decoder: weight processing is not supported for encoder-decoder LMs")
    capped = pair.model.cfg.output_logits_soft_cap > 0  # Gemma 2: center_unembed is refused (tests/test_gemma.py)
    processed = quiet(HookedVLM.from_pretrained, pair.path, fold_ln=True, center_writing_weights=True,
                      center_unembed=not capped, fold_value_biases=True)
    assert processed.cfg.normalization_type in ("RMSPre", "LNPre")
    assert processed.blocks[0].ln1.w is None and processed.vision.blocks[0].ln1.w is None
    batch, real = pair.batch(), pair.batch().attention_mask.bool()
    with torch.no_grad():
        expected = pair.hf(**batch.as_kwargs()).logits.softmax(-1)
        logits = processed(batch)
    assert max_diff(logits.softmax(-1), expected, real) <= ATOL
    assert capped or logits[real].mean(-1).abs().max() < 1e-4, "center_unembed gives zero-mean logits"


# Where tl_vlm knowingly differs from HF in half precision: OneVision runs image tiles and video frames as one
# vision batch (each hook fires once), HF as two, and half-precision matmuls round differently per batch shape.
HALF_PRECISION_EXCEPTIONS = {("llava_onevision", "video_and_image")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", params())
def test_half_precision_logits_are_hfs(loaded, name, dtype):
    """Same kernels, same casts (HF's fp32 modules kept in fp32): in half precision the logits are HF's bit for bit,
    through both loaders, with or without every activation cached, and for a HF model cast after loading (whose
    rotary frequencies .to(dtype) rounds)."""
    pair = loaded(name)
    runs = HalfPrecision.load(pair.entry.hf_class, pair.path, dtype)
    dtypes = {n: p.dtype for n, p in runs.ours.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in runs.shared.named_parameters()}, "from_pretrained keeps HF's per-module dtypes"
    assert runs.ours.vision.blocks[0].attn.W_Q.dtype == dtype and runs.ours.embed.W_E.dtype in (dtype, torch.float32)
    for case, inputs in pair.cases.items():
        if (name, case) not in HALF_PRECISION_EXCEPTIONS:
            assert runs.logit_diffs(inputs) == dict.fromkeys(("from_pretrained", "from_hf_model", "cached", "cast"), 0), case

@pytest.mark.parametrize("name, case", params(lambda e: [c for c in e.cases if c in IMAGE_CASES]))
def test_greedy_generate_equals_hf(loaded, name, case):
    pair = loaded(name)
    inputs = generation_inputs(pair.cases[case])
    with torch.no_grad():
        expected = pair.hf.generate(**inputs.as_kwargs(), max_new_tokens=8, do_sample=False)
    assert torch.equal(pair.model.generate(inputs, max_new_tokens=8), expected)
    assert torch.equal(pair.model.generate(inputs, max_new_tokens=8, use_past_kv_cache=False), expected)


SAMPLING = ({"do_sample": True}, {"do_sample": True, "temperature": 0.7, "top_p": 0.8},
            {"do_sample": False, "repetition_penalty": 1.5})


@pytest.mark.parametrize("name, case", params(lambda e: [c for c in e.cases if c in IMAGE_CASES]))
def test_seeded_sampling_and_penalties_follow_hf(loaded, name, case):
    """A random tiny model repeats its greedy token while sampled tokens vary, so every decode step's positions
    and logits have to match HF's for the draws to agree (with and without the KV cache)."""
    pair = loaded(name)
    inputs = generation_inputs(pair.cases[case])
    for settings in SAMPLING:
        torch.manual_seed(11)
        expected = pair.hf.generate(**inputs.as_kwargs(), max_new_tokens=6, **settings)
        for use_cache in (True, False):
            torch.manual_seed(11)
            tokens = pair.model.generate(inputs, max_new_tokens=6, use_past_kv_cache=use_cache, **settings)
            assert torch.equal(tokens, expected), (settings, use_cache)
    runs = [pair.model.generate(inputs, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                                generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "a generator seeds the sampling"
    # The generated ids (a decoder-only LM returns the prompt first, whose image tokens may lie past the vocabulary).
    generated = runs[0] if pair.model.capabilities.encoder_decoder else runs[0][:, inputs.shape[1]:]
    assert int(generated.max()) < pair.hf.config.get_text_config().vocab_size


@pytest.mark.parametrize("name, attention", params(lambda e: e.attentions))
def test_head_ablation_equals_hf_surgery(loaded, name, attention):
    pair = loaded(name)
    model, batch, head = pair.model, pair.batch(), 1
    cfg = model.tower(tower_of(attention)).cfg
    layer, d_head = attention_layers(pair.entry, attention, cfg.n_layers)[0], cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    columns = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        clean = model(batch)
        ablated = model.run_with_hooks(batch, fwd_hooks=[(f"{attention.format(layer)}.hook_z", ablate)])
        linear = pair.entry.heads(pair.hf)[attention](layer)
        saved = linear.weight[:, columns].clone()
        linear.weight[:, columns] = 0.0
        try:
            surgery = pair.hf(**batch.as_kwargs()).logits
        finally:
            linear.weight[:, columns] = saved
    mask = logits_mask(model, batch)
    assert max_diff(ablated, clean, mask) > 1e-3, "ablating a head must change the output"
    assert max_diff(ablated, surgery, mask) <= ATOL


@pytest.mark.parametrize("name, case", params(lambda e: [c for c in e.cases if c != "text"]))
def test_explicit_attention_matches_sdpa(loaded, name, case):
    """SDPA (no hooks) and the explicit attention path (patterns cached) agree, in every tower."""
    pair = loaded(name)
    model, inputs = pair.model, pair.cases[case]
    with torch.no_grad():
        fast = model(inputs)
        explicit, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    for attention in pair.entry.attentions:
        first = attention_layers(pair.entry, attention, model.tower(tower_of(attention)).cfg.n_layers)[0]
        assert f"{attention.format(first)}.hook_pattern" in cache, attention
    assert max_diff(fast, explicit, logits_mask(model, inputs)) <= ATOL
