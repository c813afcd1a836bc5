"""First-order attribution patching (Nanda's "attribution patching") for any hook of any tower.

The effect of patching activation A from the clean run into the corrupted run is approximated by
``(A_clean - A_corrupt) . d metric / d A`` at the corrupted run: one forward and one backward pass for
all hooks at once, instead of one forward per patched activation. Vision hooks work the same way
(their leading dimension is the image), so image patches can be ranked too.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tl_vlm.inputs import VLMInputs

Metric = Callable[[Tensor], Tensor]


def gradient_cache(
    model, inputs: VLMInputs, metric: Metric, names_filter: Callable[[str], bool]
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Metric value, activations and their gradients for the hooks passing ``names_filter``
    (keyed by the names ``model`` uses: tower-relative for a tower view)."""
    acts, grads = {}, {}
    name_of = getattr(model, "relative_name", lambda full: full)

    def save(store):
        def hook(x, hook):
            store[name_of(hook.name)] = x.detach()
        return hook

    fwd = [(names_filter, save(acts))]
    bwd = [(names_filter, save(grads))]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        value = metric(model(inputs))
        value.backward()
    return value.detach(), acts, grads


def attribution_patch(
    model, clean: VLMInputs, corrupt: VLMInputs, metric: Metric, names_filter: Callable[[str], bool]
) -> dict[str, Tensor]:
    """Estimated metric change per hook, summed over the last axis (d_model, d_head, ...):
    ``[batch, pos]`` for residual hooks, ``[batch, pos, head]`` for ``hook_z``, ``[image, patch]`` in vision."""
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=names_filter)
    _, corrupt_acts, corrupt_grads = gradient_cache(model, corrupt, metric, names_filter)
    return {
        name: ((clean_cache[name] - act) * corrupt_grads[name]).sum(-1)
        for name, act in corrupt_acts.items()
        if name in corrupt_grads
    }
