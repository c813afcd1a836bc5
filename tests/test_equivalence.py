"""HookedVLM against the HF model built from the same checkpoint: fp32, max abs diff <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_layer_outputs

ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[mask] if mask is not None else diff).max().item()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_and_every_hidden_state_match_hf(pair, padding_side):
    batch = pair.batch(padding_side)
    hf_logits, hf_language, hf_vision = hf_layer_outputs(pair.hf, batch.as_kwargs())
    with torch.no_grad():
        logits, cache = pair.model.run_with_cache(batch)
    real = batch.attention_mask.bool()
    assert real.sum() < real.numel(), "the batch must actually be padded"
    assert max_diff(logits, hf_logits, real) <= ATOL
    assert len(hf_language) == pair.model.cfg.n_layers
    for i, hidden in enumerate(hf_language):
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], hidden, real) <= ATOL, f"language layer {i}"
    assert len(hf_vision) == pair.model.vision.cfg.n_layers
    for i, hidden in enumerate(hf_vision):
        assert max_diff(cache[f"vision.blocks.{i}.hook_resid_post"], hidden) <= ATOL, f"vision layer {i}"


def test_plain_forward_matches_cached_forward(pair):
    """SDPA (no hooks) and the explicit attention path (patterns cached) agree."""
    batch = pair.batch()
    with torch.no_grad():
        fast = pair.model(batch)
        explicit, cache = pair.model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    assert "blocks.0.attn.hook_pattern" in cache and "vision.blocks.0.attn.hook_pattern" in cache
    assert max_diff(fast, explicit, batch.attention_mask.bool()) <= ATOL


def test_weight_processing_keeps_probabilities(pair):
    from tl_vlm import HookedVLM

    batch = pair.batch()
    processed = HookedVLM.from_pretrained(
        pair.path, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    assert processed.cfg.normalization_type == "RMSPre"
    assert processed.blocks[0].ln1.w is None and processed.vision.blocks[0].ln1.w is None
    with torch.no_grad():
        ref = pair.hf(**batch.as_kwargs()).logits.softmax(-1)
        probs = processed(batch).softmax(-1)
        logits = processed(batch)
    real = batch.attention_mask.bool()
    assert max_diff(probs, ref, real) <= ATOL
    assert logits[real].mean(-1).abs().max() < 1e-4, "center_unembed gives zero-mean logits"


def test_greedy_generate_equals_hf(pair):
    batch = pair.batch()
    with torch.no_grad():
        expected = pair.hf.generate(**batch.as_kwargs(), max_new_tokens=10, do_sample=False)
    tokens = pair.model.generate(batch, max_new_tokens=10)
    assert torch.equal(tokens, expected)
    without_cache = pair.model.generate(batch, max_new_tokens=10, use_past_kv_cache=False)
    assert torch.equal(without_cache, expected)


def test_sampling_is_seeded_and_valid(llava15):
    batch = llava15.batch()
    runs = [
        llava15.model.generate(batch, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                               generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape[1] <= batch.shape[1] + 6
    assert int(runs[0].max()) < llava15.model.cfg.d_vocab


def test_text_only_prompt_matches_hf(pair):
    tok = pair.model.tokenizer
    ids = tok(["USER: What is the colour of a red square? ASSISTANT:"], return_tensors="pt")
    hf_logits, hf_language, _ = hf_layer_outputs(pair.hf, dict(ids))
    with torch.no_grad():
        logits, cache = pair.model.run_with_cache(ids["input_ids"], attention_mask=ids["attention_mask"])
    assert max_diff(logits, hf_logits) <= ATOL
    assert max_diff(cache["blocks.0.hook_resid_post"], hf_language[0]) <= ATOL
    assert not any(name.startswith("vision.") for name in cache.keys())


def test_from_hf_model_shares_weights_and_matches(llava15):
    from tl_vlm import HookedVLM

    model = HookedVLM.from_hf_model(llava15.hf, llava15.model.processor)
    hf_q = llava15.hf.model.language_model.layers[0].self_attn.q_proj.weight
    assert model.blocks[0].attn.W_Q.data_ptr() == hf_q.data_ptr(), "conversion must not copy the weights"
    batch = llava15.batch()
    with torch.no_grad():
        assert max_diff(model(batch), llava15.model(batch)) == 0.0
    processed = HookedVLM.from_hf_model(llava15.hf, llava15.model.processor, fold_ln=True)
    assert processed.blocks[0].attn.W_Q.data_ptr() != hf_q.data_ptr()
    assert torch.equal(hf_q, llava15.model.blocks[0].attn.W_Q.transpose(1, 2).reshape(hf_q.shape)), "HF model untouched"


def test_seeded_sampling_and_penalties_follow_hf(pair):
    batch = pair.batch()
    for settings in ({"do_sample": True}, {"do_sample": True, "temperature": 0.7, "top_p": 0.8},
                     {"do_sample": False, "repetition_penalty": 1.5}):
        torch.manual_seed(11)
        expected = pair.hf.generate(**batch.as_kwargs(), max_new_tokens=6, **settings)
        torch.manual_seed(11)
        assert torch.equal(pair.model.generate(batch, max_new_tokens=6, **settings), expected), settings


def test_generation_defaults_without_generation_config(tmp_path, checkpoints):
    import shutil

    from tl_vlm import HookedVLM

    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["llava15"], bare)
    (bare / "generation_config.json").unlink()
    model = HookedVLM.from_pretrained(bare)
    assert model.generation_config.eos_token_id is not None, "falls back to the model config, as HF does"
    model.generation_config.num_beams = 2
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(model.to_tokens("USER: hi ASSISTANT:"), max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_hfs(pair, dtype):
    """Same kernels, same casts: in half precision the logits are HF's, not merely close (both loaders)."""
    from transformers import AutoModelForImageTextToText

    from tl_vlm import HookedVLM

    hf = AutoModelForImageTextToText.from_pretrained(pair.path, dtype=dtype).eval()
    batch = pair.batch()
    real = batch.attention_mask.bool()
    with torch.no_grad():
        reference = hf(**batch.as_kwargs()).logits.float()
        for model in (HookedVLM.from_pretrained(pair.path, dtype=dtype), HookedVLM.from_hf_model(hf)):
            assert max_diff(model(batch).float(), reference, real) <= ATOL
