"""Next-token choice for generate, with transformers' own logits warpers."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def sample_next_token(
    logits: Float[Tensor, "batch d_vocab"],
    ids: Int[Tensor, "batch pos"],
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    if not do_sample:
        return logits.argmax(-1)
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    probs = warpers(ids, logits).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
