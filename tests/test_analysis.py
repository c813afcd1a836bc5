"""Image-token ablation and logit-lens read-outs."""

from __future__ import annotations

import torch

from conftest import PROMPTS
from tl_vlm.analysis.ablation import ablate_image_tokens, mean_image_embedding
from tl_vlm.analysis.logit_lens import language_logit_lens, vision_logit_lens
from tl_vlm.zoo.data import sample_images


def test_zero_and_mean_ablation(llava15):
    model = llava15.model
    inputs = model.prepare(images=sample_images(1, seed=3), text=PROMPTS[0])
    image = model.image_token_mask(inputs.input_ids)
    with torch.no_grad():
        clean = model(inputs)
        zeroed = ablate_image_tokens(model, inputs, "zero")
        _, cache = model.run_with_cache(inputs, names_filter="hook_embed")
        manual = model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", lambda e, hook: e.masked_fill(image[..., None], 0.0))])
        assert torch.equal(zeroed, manual)
        assert not torch.allclose(zeroed, clean)
        references = [model.prepare(images=sample_images(1, seed=s), text=PROMPTS[0]) for s in (10, 11, 12)]
        mean = mean_image_embedding(model, references)
        assert mean.shape == (int(image.sum()), model.cfg.d_model)
        one_ref = ablate_image_tokens(model, inputs, "mean", mean=mean_image_embedding(model, references[:1]))
        assert torch.allclose(one_ref, model(references[0]), atol=1e-5), "mean over one reference = that reference's image"


def test_logit_lens_last_layer_is_the_output(pair):
    model = pair.model
    inputs = pair.batch()
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    lens = language_logit_lens(model, cache)
    assert lens.shape[0] == model.cfg.n_layers + 1
    assert torch.allclose(lens[-1], logits.softmax(-1), atol=1e-5)
    paper = language_logit_lens(model, cache, normed=False, top_k=50)
    real = inputs.attention_mask.bool()  # padding's logits are all tied, and top-k keeps ties (as HF's warper)
    assert torch.allclose(paper.sum(-1), torch.ones(()), atol=1e-5) and ((paper > 0).sum(-1)[:, real] <= 50).all()
    if len(model.vlm_cfg.feature_layers) == 1:
        vision = vision_logit_lens(model, cache)
        assert vision.shape[0] == model.vision.cfg.n_layers and vision.shape[-1] == model.cfg.d_vocab


def test_text_to_image_knockout_makes_output_independent_of_the_image(pair):
    from tl_vlm.analysis.knockout import attention_knockout, knockout_text_to_image

    model = pair.model
    sizes = [(60, 30)] if pair.variant == "llava_next_mistral" else None
    a, b = (model.prepare(images=sample_images(1, seed=s, sizes=sizes), text=PROMPTS[0]) for s in (30, 31))
    with torch.no_grad():
        assert not torch.allclose(model(a)[0, -1], model(b)[0, -1])
        knocked_a, knocked_b = knockout_text_to_image(model, a), knockout_text_to_image(model, b)
        assert torch.allclose(knocked_a[0, -1], knocked_b[0, -1], atol=1e-5)
        # The same knockout on the explicit attention path (patterns cached) agrees with the SDPA path.
        image = model.image_token_mask(a.input_ids)
        with attention_knockout(model, range(model.cfg.n_layers), ~image, image):
            explicit, cache = model.run_with_cache(a, names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.allclose(explicit, knocked_a, atol=1e-4)
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    text_q, image_k = (~image[0]).nonzero()[:, 0], image[0].nonzero()[:, 0]
    assert pattern[:, text_q][:, :, image_k].abs().max() == 0
    assert all(block.attn.knockout is None for block in model.blocks), "the knockout ends with the context"
