"""Spatial index: which image region each image token in the language sequence stands for.

``spatial_index(model, inputs, images)`` is a table with one row per image token: its batch row and
language position, the image it comes from, the vision-tower row (``tile``: the image for LLaVA, one
anyres tile for LLaVA-NeXT) and patch index feeding it, its (row, col) cell in that tile's patch grid,
and its pixel box ``x0, y0, x1, y1`` in the original image (in the processed image when no original
images are given). Tokens without a cell (a kept CLS token, NeXT's row-end newline) have ``kind`` "cls" /
"newline" and no box. Read it backwards for "which language positions does vision patch p feed".
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from tl_vlm.inputs import VLMInputs


def spatial_index(model, inputs: VLMInputs, images=None) -> pd.DataFrame:
    """One row per image token, in the order of the placeholders (batch-major)."""
    sizes = [image.size for image in images] if images is not None else None
    cells = model.image_token_cells(inputs, sizes)
    positions = model.image_token_mask(inputs.input_ids).nonzero().tolist()
    if len(positions) != len(cells):
        raise ValueError(f"{len(cells)} image cells for {len(positions)} image placeholders; use the processor's inputs")
    table = pd.DataFrame(cells)
    table.insert(0, "position", [p for _, p in positions])
    table.insert(0, "batch", [b for b, _ in positions])
    return table


def region_mask(
    index: pd.DataFrame, input_ids: Tensor, image: int, box: tuple[float, float, float, float]
) -> Bool[Tensor, "batch pos"]:
    """Language positions of image ``image`` whose cell overlaps ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    rows = index[
        (index["image"] == image) & (index["kind"] == "patch")
        & (index["x0"] < x1) & (index["x1"] > x0) & (index["y0"] < y1) & (index["y1"] > y0)
    ]
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    mask[torch.tensor(rows["batch"].values, dtype=torch.long), torch.tensor(rows["position"].values, dtype=torch.long)] = True
    return mask


def patch_image_region(
    model, target: VLMInputs, source: VLMInputs, mask: Bool[Tensor, "batch pos"], hook_name: str = "hook_embed"
) -> Tensor:
    """Logits of ``target`` with ``source``'s activation at ``hook_name`` pasted at the masked positions,
    e.g. "the top-left quarter of image A into image B" with ``mask = region_mask(index, ids, 0, box)``."""
    if target.input_ids.shape != source.input_ids.shape:
        raise ValueError("source and target must have the same token layout (same prompt, same image sizes)")
    _, cache = model.run_with_cache(source, names_filter=hook_name)
    mask = mask.to(model.device)

    def paste(act, hook):
        act[mask] = cache[hook_name][mask]
        return act

    return model.run_with_hooks(target, fwd_hooks=[(hook_name, paste)])


def box_from_fraction(size: tuple[int, int], fraction: tuple[float, float, float, float]) -> tuple[float, ...]:
    """A box given as fractions of the image (e.g. (0, 0, .5, .5) = top-left quarter) in pixels of ``size`` (w, h)."""
    w, h = size
    return (fraction[0] * w, fraction[1] * h, fraction[2] * w, fraction[3] * h)
