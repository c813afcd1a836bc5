"""A vision tower's hidden states, run only as deep as anyone reads them.

Hidden state ``j`` is the input of block ``j`` (``j = 0`` the embedding), as in HF's ``hidden_states``. Blocks after
the deepest state the VLM reads run only when one of their hooks is attached: they cannot change the output, and
skipping them is free speed. ViTTower and PixtralVisionTower read their feature layers this way.
"""

from __future__ import annotations

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from tl_vlm.components.hooks import observed, run_hook


def kept_hidden_states(
    blocks: nn.ModuleList, resid: Float[Tensor, "image pos d_model"], keep: list[int], *block_args
) -> dict[int, Float[Tensor, "image pos d_model"]]:
    """The hidden states with the indices in ``keep`` (0..len(blocks)); ``block_args`` go to every block."""
    deepest = max(keep)
    # Past the deepest state read, a block runs only if it (or one after it) has a hook attached.
    stop = next((i + 1 for i in range(len(blocks) - 1, deepest - 1, -1) if observed(blocks[i])), deepest)
    out = {}
    for i in range(stop):
        # A feature read at hidden state i sees what block i's hook_resid_pre made of it.
        resid = run_hook(blocks[i].hook_resid_pre, resid)
        if i in keep:
            out[i] = resid
        resid = blocks[i](resid, *block_args, resid_pre_hooked=True)
    if stop in keep:
        out[stop] = resid
    return out
