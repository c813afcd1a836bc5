"""Attention knockout by editing the attention mask: chosen query positions cannot read chosen key
positions in chosen layers. The edit stays a mask, so SDPA keeps running (no explicit softmax path).

    with attention_knockout(model, layers=range(model.cfg.n_layers), queries=text, keys=image):
        logits = model(inputs)          # no text position can read an image position in any layer
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from jaxtyping import Bool
from torch import Tensor


@contextmanager
def attention_knockout(
    model,
    layers: Iterable[int],
    queries: Bool[Tensor, "batch pos"],
    keys: Bool[Tensor, "batch pos"],
    tower: str = "language",
) -> Iterator[None]:
    """Block attention from ``queries`` to ``keys`` (boolean position masks) in ``layers`` of ``tower``."""
    blocks = model.towers()[tower].blocks
    blocked = (queries[:, :, None] & keys[:, None, :])[:, None]
    chosen = [blocks[layer].attn for layer in layers]
    try:
        for attn in chosen:
            attn.knockout = blocked
        yield
    finally:
        for attn in chosen:
            attn.knockout = None


def knockout_text_to_image(model, inputs, layers: Iterable[int] | None = None) -> Tensor:
    """Logits when no text position may read any image position (all language layers by default)."""
    image = model.image_token_mask(inputs.input_ids.to(model.device))
    real = inputs.attention_mask.to(model.device).bool() if inputs.attention_mask is not None else torch.ones_like(image)
    layers = range(model.cfg.n_layers) if layers is None else layers
    if model.capabilities.cross_attention:
        # Images are read only by the cross-attention blocks: no text reads them when those blocks add nothing.
        # (Masking every key would not do it: a row with no key left attends to all of them, as in HF's mask.)
        chosen = [layer for layer in layers if layer in model.vlm_cfg.cross_attention_layers]
        silence = [(f"blocks.{layer}.hook_cross_attn_out", lambda x, hook: x.masked_fill(real[..., None], 0.0))
                   for layer in chosen]
        return model.run_with_hooks(inputs, fwd_hooks=silence)
    with attention_knockout(model, layers, queries=~image & real, keys=image):
        return model(inputs)
