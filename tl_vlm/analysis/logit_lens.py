"""Logit lens read-outs of image positions, for the language and the vision tower.

Language tower: the residual stream entering each layer (and the final one) at image positions,
through ``ln_final`` and ``W_U`` (``normed=True``), or straight through ``W_U`` keeping the top-k logits
renormalised (Jiang et al.'s variant, ``normed=False``).

Vision tower (documented choice of path): the vision residual stream after each layer, selected as
the family selects its feature layer (CLS dropped for "default"), through the projector, then
``ln_final`` and ``W_U``. The language blocks are skipped, as a logit lens skips later layers.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache


def lens_hook_names(model) -> list[str]:
    """The streams a language logit lens reads: each layer's input, then the final stream (layer n)."""
    n = model.cfg.n_layers
    return [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def image_positions(model, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Language positions holding image features (BLIP-2: the query outputs) in a decoder-only language model."""
    if model.capabilities.encoder_decoder:
        raise NotImplementedError("image positions of an encoder-decoder language model are encoder positions")
    if not model.capabilities.image_positions:
        raise NotImplementedError("legacy BLIP-2 configs (queries prepended, no image_token_index); use a current config")
    return model.image_token_mask(input_ids)


def lens_probs(
    model, resid: Float[Tensor, "... d_model"], normed: bool = True, top_k: int | None = None
) -> Float[Tensor, "... d_vocab"]:
    """Vocabulary distribution of residual-stream vectors: through ``ln_final`` (normed) or not, top-k renormalised."""
    logits = (model.ln_final(resid) if normed else resid) @ model.W_U
    if top_k is not None:
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    return logits.softmax(-1)


def language_logit_lens(
    model, cache: ActivationCache, normed: bool = True, top_k: int | None = None
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """Probabilities at every position for each layer's input and the final stream (layer n)."""
    return lens_probs(model, torch.stack([cache[name] for name in lens_hook_names(model)]), normed, top_k)


def vision_logit_lens(model, cache: ActivationCache) -> Float[Tensor, "layer image patch d_vocab"]:
    """Probabilities of each vision patch after each vision layer, read through projector + unembedding.
    Needs a cache with ``vision.blocks.*.hook_resid_post`` (LLaVA-style single-layer projector input)."""
    cfg = model.vlm_cfg
    if len(cfg.feature_layers) != 1:
        raise NotImplementedError("vision lens for projectors that read several vision layers at once")
    probs = []
    with torch.no_grad():
        for layer in range(model.vision.cfg.n_layers):
            hidden = cache[f"vision.blocks.{layer}.hook_resid_post"]
            features = model.select_features({cfg.feature_layers[0]: hidden})
            probs.append((model.ln_final(model.projector(features)) @ model.W_U).softmax(-1))
    return torch.stack(probs)
