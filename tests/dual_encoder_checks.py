"""What the dual-encoder tests share (CLIP / SigLIP in test_clip.py, SigLIP 2 in test_siglip2.py): their texts,
every hidden state of both towers against HF's, and a head ablation against the same surgery on HF's weights."""

from __future__ import annotations

import torch
from conformance.registry import ATOL, quiet
from transformers import AutoModel

TEXTS = ["a red bar", "the blue circle is left of the green square", "chart"]


def assert_hidden_states_match(cache, model, ref) -> None:
    """Each tower's hidden states (every block's input, then the last block's output) equal HF's ``ref``'s."""
    for tower, hf_hidden in (("vision", ref.vision_model_output.hidden_states), ("text", ref.text_model_output.hidden_states)):
        n_layers = model.towers()[tower].cfg.n_layers
        ours = [cache[f"{tower}.blocks.{i}.hook_resid_pre"] for i in range(n_layers)] + [
            cache[f"{tower}.blocks.{n_layers - 1}.hook_resid_post"]]
        assert len(ours) == len(hf_hidden)
        for i, (a, b) in enumerate(zip(ours, hf_hidden)):
            assert a.shape == b.shape and (a - b).abs().max() <= ATOL, f"{tower} hidden state {i}"


def assert_head_ablation_equals_hf_surgery(model, path, inputs, tower: str, layer: int = 1, head: int = 2) -> None:
    """Zeroing one head's ``hook_z`` gives the logits of HF's model (loaded from ``path``) with that head's columns
    of the output projection zeroed, and changes them."""
    d_head = model.towers()[tower].cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        ours = model.run_with_hooks(inputs, fwd_hooks=[(f"{tower}.blocks.{layer}.attn.hook_z", ablate)])
        surgery = quiet(AutoModel.from_pretrained, path).eval()
        hf_tower = surgery.text_model if tower == "text" else surgery.vision_model
        hf_tower.encoder.layers[layer].self_attn.out_proj.weight[:, head * d_head:(head + 1) * d_head] = 0.0
        ref = surgery(**inputs.as_kwargs()).logits_per_image
        plain = model(inputs)
    assert (ours - ref).abs().max() <= ATOL
    assert (ours - plain).abs().max() > 1e-3  # the ablation did something


def assert_half_precision_is_hf_bit_for_bit(hf, model, inputs: dict, dtype: torch.dtype) -> None:
    """With both models in ``dtype`` the logits equal HF's bit for bit, and caching every hook changes nothing."""
    inputs = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
    with torch.no_grad():
        ref = hf(**inputs)
        plain = model(inputs)
        cached, _ = model.run_with_cache(inputs)
    assert torch.equal(plain, ref.logits_per_image)
    assert torch.equal(cached, plain)
