"""Random small Gemma 3 and PaliGemma 1 / 2 configurations against HF, so no claim holds only on the fixtures: head
counts and widths, GQA down to one key/value head, query_pre_attn_scalar, sliding windows shorter and longer than
the prompt, layer-type patterns, RoPE bases and scaling, soft caps, pooling sizes, several images per prompt,
prefix / suffix splits, both paddings. fp32: logits and every hidden state <= 1e-4; bfloat16: HF's bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from conformance.registry import quiet
from tl_vlm import HookedVLM, VLMInputs

VOCAB, PAD, BOS, IMAGE, BOI, EOI = 96, 0, 1, 2, 3, 4


def siglip(rng: random.Random, image_size: int, patch: int) -> SiglipVisionConfig:
    heads = rng.choice([1, 2, 4])
    return SiglipVisionConfig(hidden_size=8 * heads, intermediate_size=16 * heads, num_hidden_layers=2,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def gemma_text(rng: random.Random, kind: str):
    heads, d_head = rng.choice([2, 4]), rng.choice([8, 16])
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    layers = rng.choice([2, 3])
    common = dict(vocab_size=VOCAB, hidden_size=rng.choice([32, 48]), intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=d_head, max_position_embeddings=128,
                  rms_norm_eps=rng.choice([1e-6, 1e-5]), pad_token_id=PAD, bos_token_id=BOS, eos_token_id=VOCAB - 1,
                  tie_word_embeddings=rng.random() < 0.7)
    if kind == "gemma":
        return GemmaConfig(**common, hidden_act="gelu_pytorch_tanh",
                           rope_parameters={"rope_type": "default", "rope_theta": rng.choice([1e4, 1e6])})
    # A sliding first layer and a global last one; windows mostly shorter than an image or a prefix.
    pattern = ["sliding_attention", *[rng.choice(["sliding_attention", "full_attention"]) for _ in range(layers - 2)],
               "full_attention"]
    local = dict(query_pre_attn_scalar=rng.choice([d_head, 2 * d_head, 64]), sliding_window=rng.choice([2, 3, 64]),
                 layer_types=pattern, hidden_activation="gelu_pytorch_tanh")
    if kind == "gemma2":
        return Gemma2Config(**common, **local, attn_logit_softcapping=rng.choice([5.0, 50.0]),
                            final_logit_softcapping=rng.choice([3.0, 30.0]),
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    scaled = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    return Gemma3TextConfig(**common, **local, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": rng.choice([1e4, 5e4])},
        "full_attention": rng.choice([scaled, {"rope_type": "default", "rope_theta": 1e6}])})


def draw(kind: str, seed: int):
    """(HF model, inputs) for one random configuration."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    patch = rng.choice([4, 8])
    grid = rng.choice([2, 4])
    vision = siglip(rng, patch * grid, patch)
    text = gemma_text(rng, "gemma3_text" if kind == "gemma3" else kind)
    if kind == "gemma3":
        side = rng.choice([s for s in (2, 4) if grid % s == 0])
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=side * side,
                              image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
        model, per_image = Gemma3ForConditionalGeneration(config), side * side
    else:
        config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE,
                                 projection_dim=text.hidden_size, hidden_size=text.hidden_size)
        model, per_image = PaliGemmaForConditionalGeneration(config), grid * grid
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, 0.08)
    rows, types, images = [], [], 0
    for i in range(2):
        words = lambda n: [rng.randrange(EOI + 1, VOCAB) for _ in range(n)]  # noqa: E731
        if kind == "gemma3":  # text, then 1 or 2 images (boi, soft tokens, eoi), then text
            row = [BOS, *words(2 + 3 * i)]
            for _ in range(rng.choice([1, 2])):
                row += [BOI, *[IMAGE] * per_image, EOI, *words(1)]
                images += 1
            row += words(2 + i)
            kinds = [int(t == IMAGE) for t in row]
        else:  # image tokens, BOS, prompt (prefix); then a suffix of 0 to 3 tokens
            prefix, suffix = [*[IMAGE] * per_image, BOS, *words(3 + 3 * i)], words(rng.choice([0, 1, 3]))
            row, kinds = prefix + suffix, [0] * len(prefix) + [1] * len(suffix)
            images += 1
        rows.append(row)
        types.append(kinds)
    width, side_pad = max(map(len, rows)), rng.choice(["left", "right"])
    if len({len(r) for r in rows}) == 1:
        rows[0], types[0] = rows[0][:-1], types[0][:-1]
    ids, mask, tt = [], [], []
    for row, kinds in zip(rows, types):
        pad = width - len(row)
        ids.append([PAD] * pad + row if side_pad == "left" else row + [PAD] * pad)
        mask.append([0] * pad + [1] * len(row) if side_pad == "left" else [1] * len(row) + [0] * pad)
        tt.append([0] * pad + kinds if side_pad == "left" else kinds + [0] * pad)
    inputs = VLMInputs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt),
                       pixel_values=torch.randn(images, 3, vision.image_size, vision.image_size))
    return model.eval(), inputs


DRAWS = [("gemma3", 1), ("gemma3", 2), ("gemma3", 3), ("gemma", 4), ("gemma2", 5), ("gemma2", 6)]


@pytest.mark.parametrize("kind, seed", DRAWS, ids=[f"{k}-{s}" for k, s in DRAWS])
def test_random_gemma_matches_hf(kind, seed):
    hf, inputs = draw(kind, seed)
    model = quiet(HookedVLM.from_hf_model, hf)
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        reference = hf(**inputs.as_kwargs(), output_hidden_states=True)
        logits, cache = model.run_with_cache(inputs)
    assert (logits - reference.logits)[real].abs().max() <= 1e-4
    n = model.cfg.n_layers
    for i in range(n - 1):  # HF's last hidden state is after the final norm
        assert (cache[f"blocks.{i}.hook_resid_post"] - reference.hidden_states[i + 1])[real].abs().max() <= 1e-4, i
    half = hf.to(torch.bfloat16)
    ours = quiet(HookedVLM.from_hf_model, half)
    with torch.no_grad():
        assert torch.equal(ours(inputs)[real], half(**inputs.as_kwargs()).logits[real])
