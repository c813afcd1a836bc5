"""Visual information flow (Neo et al. 2025): where the answer reads the image from, and in which layers.

- ``region_ablation``: mean or zero ablation of the image tokens of a region -> drop in the answer's probability.
- ``region_ablation_map``: the same over a grid of boxes on each image (patch-based families), for plotting.
- ``knockout_by_layer``: block attention from the last position (or all text) to the image positions over a
  sliding window of language layers -> drop in the answer's probability, per window start.

The answer's probability is read at the last real position of each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.analysis.ablation import ablate_image_tokens
from tl_vlm.analysis.knockout import attention_knockout
from tl_vlm.analysis.logit_lens import image_positions
from tl_vlm.analysis.spatial import region_mask, spatial_index
from tl_vlm.inputs import VLMInputs


def _real(model, inputs: VLMInputs) -> Bool[Tensor, "batch pos"]:
    ids = inputs.input_ids.to(model.device)
    return inputs.attention_mask.to(model.device).bool() if inputs.attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)


def _last(real: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    last = torch.zeros_like(real)
    last[torch.arange(real.shape[0]), (real * torch.arange(real.shape[1], device=real.device)).argmax(-1)] = True
    return last


def answer_probability(model, logits: Float[Tensor, "batch pos d_vocab"], inputs: VLMInputs, answer: str | int) -> Float[Tensor, " batch"]:
    """Probability of the answer (its first token) at each row's last real position."""
    token = answer if isinstance(answer, int) else model.tokenizer.encode(answer, add_special_tokens=False)[0]
    return logits[_last(_real(model, inputs))].softmax(-1)[:, token]


def region_ablation(
    model,
    inputs: VLMInputs,
    answer: str | int,
    positions: Bool[Tensor, "batch pos"],
    mode: Literal["zero", "mean"] = "zero",
    mean: Tensor | None = None,
) -> pd.DataFrame:
    """Per row: the answer's probability clean, with the image tokens at ``positions`` ablated, and the drop."""
    with torch.no_grad():
        clean = answer_probability(model, model(inputs), inputs, answer)
        ablated = answer_probability(model, ablate_image_tokens(model, inputs, mode, mean, positions), inputs, answer)
    return pd.DataFrame({"p_clean": clean.cpu(), "p_ablated": ablated.cpu(), "drop": (clean - ablated).cpu()})


def region_ablation_map(
    model,
    inputs: VLMInputs,
    answer: str | int,
    images: Sequence,
    grid: tuple[int, int] = (3, 3),
    mode: Literal["zero", "mean"] = "zero",
    mean: Tensor | None = None,
) -> pd.DataFrame:
    """Ablate each box of a ``grid`` (rows, cols) over each image in turn: one row per (image, box) with the box in
    pixels and the drop of that image's row (one image per row). BLIP-2 queries have no boxes: use
    ``region_ablation`` with query positions."""
    index = spatial_index(model, inputs, images)
    if (index["kind"] == "query").any():
        raise ValueError("BLIP-2 query outputs have no pixel box; ablate chosen queries with region_ablation")
    with torch.no_grad():
        clean = answer_probability(model, model(inputs), inputs, answer)
    rows = []
    for i, image in enumerate(images):
        w, h = image.size
        for r in range(grid[0]):
            for c in range(grid[1]):
                box = (c * w / grid[1], r * h / grid[0], (c + 1) * w / grid[1], (r + 1) * h / grid[0])
                mask = region_mask(index, inputs.input_ids, i, box)
                if not mask.any():
                    continue
                with torch.no_grad():
                    ablated = answer_probability(model, ablate_image_tokens(model, inputs, mode, mean, mask), inputs, answer)
                drop = float(clean[i] - ablated[i])
                rows.append(dict(image=i, row=r, col=c, x0=box[0], y0=box[1], x1=box[2], y1=box[3], drop=drop))
    return pd.DataFrame(rows)


def knockout_by_layer(
    model, inputs: VLMInputs, answer: str | int, window: int = 1, queries: Literal["last", "text"] = "last"
) -> pd.DataFrame:
    """For each window [start, start + window) of language layers: block ``queries`` (the last real position, or
    every real text position) from reading any image position; one row per (start, batch row) with the drop."""
    real = _real(model, inputs)
    image = image_positions(model, inputs.input_ids.to(model.device))
    chosen = _last(real) if queries == "last" else real & ~image
    rows = []
    with torch.no_grad():
        clean = answer_probability(model, model(inputs), inputs, answer)
        for start in range(model.cfg.n_layers - window + 1):
            with attention_knockout(model, range(start, start + window), chosen, image):
                knocked = answer_probability(model, model(inputs), inputs, answer)
            rows += [dict(start=start, end=start + window, batch=b, p_clean=float(clean[b]), p_knocked=float(knocked[b]),
                          drop=float(clean[b] - knocked[b])) for b in range(clean.shape[0])]
    return pd.DataFrame(rows)
