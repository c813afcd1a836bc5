"""QK-norm (TL's use_qk_norm): a LLaVA with a Qwen3 language model, against HF built from the same config."""

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen3Config

from tl_vlm import HookedVLM


def test_qwen3_language_model_matches_hf_and_hooks_its_qk_norms():
    torch.manual_seed(0)
    text = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    hf = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=99, image_seq_length=4, tie_word_embeddings=True)
    ).eval()
    for name, p in hf.named_parameters():
        if "norm" in name:  # HF initialises norms to ones: make the QK-norm weights matter
            p.data += torch.randn_like(p) * 0.3
    model = HookedVLM.from_hf_model(hf)
    assert model.cfg.use_qk_norm
    ids, pixels = torch.tensor([[1, 99, 99, 99, 99, 5, 6, 7]]), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        logits, cache = model.run_with_cache(input_ids=ids, pixel_values=pixels)
    assert (ref.logits - logits).abs().max() <= 1e-4
    # HF's last hidden state is after the final norm; the first layer's output is the residual stream
    assert (ref.hidden_states[1] - cache["blocks.0.hook_resid_post"]).abs().max() <= 1e-4
    assert cache["blocks.0.attn.hook_q"].shape == cache["blocks.0.attn.q_norm.hook_normalized"].shape == (1, 8, 4, 32)
    assert cache["blocks.0.attn.k_norm.hook_scale"].shape == (1, 8, 2, 1)
    # the normalised queries are what attention uses: editing them changes the output
    doubled = model.run_with_hooks(
        input_ids=ids, pixel_values=pixels, fwd_hooks=[("blocks.1.attn.q_norm.hook_normalized", lambda t, hook: 2 * t)]
    )
    assert (doubled - logits).abs().max() > 1e-3
