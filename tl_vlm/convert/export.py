"""tl_vlm weights back into a HF model: the weight rules run in reverse.

Every rule's layout transform returns views of the HF tensor it reads (that is how conversion shares storage), so
applying it to the HF model's own tensor gives views to copy the TL parameter into. A tuned model is saved this way
with HF's ``save_pretrained``, and loads back in HF and in tl_vlm alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from tl_vlm.convert.rules import WeightMap


@torch.no_grad()
def write_into_hf(model: nn.Module, hf_model: nn.Module, weight_map: WeightMap, normalize_key: Callable[[str], str]) -> None:
    """Copy every parameter of ``model`` into ``hf_model`` (built from the same config). Weights that weight
    processing folded away (``fold_ln``) have no HF form: refused, naming them."""
    params = dict(model.named_parameters())
    written = set()
    for key, tensor in hf_model.state_dict(keep_vars=True).items():
        matched = weight_map.match(normalize_key(key))
        if matched is None:
            continue
        name, transform = matched
        views = transform(tensor.data)
        names, views = (name, views) if isinstance(name, tuple) else ((name,), (views,))
        for one, view in zip(names, views, strict=True):
            if one not in params:
                raise ValueError(
                    f"{one!r} (HF {key!r}) is gone from the model: processed weights (fold_ln, ...) have no HF form; "
                    "save the model before processing its weights"
                )
            if view.untyped_storage().data_ptr() != tensor.data.untyped_storage().data_ptr():
                raise RuntimeError(f"the rule for {key!r} does not give a view of the HF tensor; cannot write it back")
            view.copy_(params[one])
            written.add(one)
    missing = set(params) - written
    if missing:
        raise ValueError(f"{len(missing)} parameters have no HF weight to go to: {sorted(missing)[:8]}")
