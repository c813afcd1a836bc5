"""CircuitsVis attention views of a VLM prompt, with image tokens named by the grid cell they stand for.

A LLaVA prompt holds hundreds of identical ``<image>`` tokens; labelled ``img0 r2c5`` (image 0, grid row 2,
column 5: the spatial index's cell) instead, an attention pattern over them can be read. Other image tokens
are named by their kind (``img0 newline``, ``img0 cls``, Q-Former queries ``img0 q3``).
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.inputs import VLMInputs


def token_labels(model, inputs: VLMInputs, row: int = 0) -> list[str]:
    """One label per position of prompt ``row``: its text token, or its image cell."""
    labels = model.to_str_tokens(inputs.input_ids[row])
    if inputs.pixel_values is None:
        return labels
    if not model.capabilities.spatial_cells:  # queries: no grid cell, so number them
        positions = model.image_token_mask(inputs.input_ids[row : row + 1])[0].nonzero()[:, 0].tolist()
        for i, position in enumerate(positions):
            labels[position] = f"img q{i}"
        return labels
    table = spatial_index(model, inputs)
    for cell in table[table.batch == row].itertuples():
        where = f"r{cell.row}c{cell.col}" if cell.kind in ("patch", "pooled", "video") else cell.kind
        labels[cell.position] = f"img{cell.image} {where}"
    return labels


def attention_patterns(model, inputs: VLMInputs, pattern: Float[Tensor, "head query key"], row: int = 0):
    """``circuitsvis.attention.attention_patterns`` for one prompt's (language) pattern, image tokens named by
    cell; e.g. ``attention_patterns(model, inputs, cache["blocks.1.attn.hook_pattern"][0])``."""
    from circuitsvis.attention import attention_patterns as render

    return render(tokens=token_labels(model, inputs, row), attention=pattern.detach().float().cpu())
