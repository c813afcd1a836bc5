"""Logit lens read-outs of image positions, for the language and the vision tower.

Language tower: lens layer l reads HF's ``hidden_states[l]``: for l < n the stream entering block l
(``blocks.{l}.hook_resid_pre``), for l = n the final stream through ``ln_final`` (HF's last hidden state, so
the last lens layer is the model's own output distribution). Each is unembedded (``unembed``: ``W_U``, ``b_U``)
and softmaxed, as Jiang et al.'s ``softmax(lm_head(hidden_states[l]))`` (``normed=False``); ``top_k`` keeps the
k largest logits (ties included, HF's ``TopKLogitsWarper``) and renormalises, as their LLaVA code does with
k=50. ``normed=True`` (the classic logit lens) also puts layers l < n through ``ln_final``. The paper variant
reads the raw stream through ``W_U``: on a model loaded with ``fold_ln=True`` the folded ``W_U`` carries the
final norm's weights, so load without folding to reproduce the paper.

Vision tower (documented choice of path): the vision residual stream after each layer, selected as
the family selects its feature layer (CLS dropped for "default"), through the projector, then
``ln_final`` and ``W_U``. The language blocks are skipped, as a logit lens skips later layers.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformers import TopKLogitsWarper

from tl_vlm.components.embeddings import soft_cap


def lens_hook_names(model) -> list[str]:
    """The streams a language logit lens reads: each layer's input, then the last block's output (layer n)."""
    n = model.cfg.n_layers
    return [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def hidden_state(
    model, cache: ActivationCache | dict[str, Tensor], layer: int, normed: bool = False
) -> Float[Tensor, "batch pos d_model"]:
    """HF's ``hidden_states[layer]`` from a cache of ``lens_hook_names``: the stream entering block ``layer``, or
    for ``layer == n_layers`` the last block's output through ``ln_final``. ``normed``: layers below n through
    ``ln_final`` too."""
    n = model.cfg.n_layers
    stream = cache[lens_hook_names(model)[layer]]
    return model.ln_final(stream) if normed or layer == n else stream


def image_positions(model, input_ids: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """Language positions holding image features (BLIP-2: the query outputs) in a decoder-only language model."""
    if model.capabilities.encoder_decoder:
        raise NotImplementedError("image positions of an encoder-decoder language model are encoder positions")
    if model.capabilities.cross_attention:
        raise NotImplementedError("images enter this model by cross-attention: no language position holds image features")
    if not model.capabilities.image_positions:
        raise NotImplementedError("legacy BLIP-2 configs (queries prepended, no image_token_index); use a current config")
    return model.image_token_mask(input_ids)


def lens_probs(
    model, resid: Float[Tensor, "... d_model"], normed: bool = True, top_k: int | None = None
) -> Float[Tensor, "... d_vocab"]:
    """Vocabulary distribution of residual-stream vectors: through ``ln_final`` (normed) or not, then ``unembed``;
    with ``top_k``, the k largest logits (and any tied with the k-th) renormalised."""
    # Gemma 2 caps its logits: the last lens layer is still the model's own distribution.
    logits = soft_cap(model.unembed(model.ln_final(resid) if normed else resid), model.cfg.output_logits_soft_cap)
    if top_k is not None:
        logits = TopKLogitsWarper(top_k)(None, logits)  # input ids are unused by this warper
    return logits.softmax(-1)


def language_logit_lens(
    model, cache: ActivationCache, normed: bool = True, top_k: int | None = None
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """Probabilities at every position of HF's ``hidden_states[l]`` for l = 0..n (see ``hidden_state``)."""
    return torch.stack(
        [lens_probs(model, hidden_state(model, cache, l, normed), False, top_k) for l in range(model.cfg.n_layers + 1)]
    )


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
            probs.append(lens_probs(model, model.projector(features)))
    return torch.stack(probs)
