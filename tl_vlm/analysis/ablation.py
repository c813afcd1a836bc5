"""Image-token ablation: replace the image features in the language stream and see what changes.

``mode="zero"`` zeroes the merged embedding at the chosen image positions; ``mode="mean"`` puts the
mean image-token embedding of a reference set there (per image-token index when the reference inputs
share the layout, else one global mean vector) — the usual "mean ablation" baseline.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.inputs import VLMInputs


def mean_image_embedding(model, references: list[VLMInputs]) -> Float[Tensor, "n_image_tokens d_model"] | Float[Tensor, " d_model"]:
    """Mean ``hook_embed`` over the image tokens of ``references``: per token index if every reference has the
    same number of image tokens, else one vector."""
    rows = []
    with torch.no_grad():
        for inputs in references:
            _, cache = model.run_with_cache(inputs, names_filter="hook_embed")
            mask = model.image_token_mask(inputs.input_ids.to(model.device))
            rows.extend(cache["hook_embed"][b][mask[b]] for b in range(mask.shape[0]))
    if len({r.shape[0] for r in rows}) == 1:
        return torch.stack(rows).mean(0)
    return torch.cat(rows).mean(0)


def ablate_image_tokens(
    model,
    inputs: VLMInputs,
    mode: Literal["zero", "mean"] = "zero",
    mean: Tensor | None = None,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the image tokens (or only ``positions``, a subset of them) ablated."""
    image = model.image_token_mask(inputs.input_ids.to(model.device))
    chosen = image if positions is None else image & positions.to(image.device)
    if positions is not None and not torch.equal(chosen, positions.to(image.device)):
        raise ValueError("positions must be image-token positions (see model.image_token_mask)")
    if mode == "mean" and mean is None:
        raise ValueError("mode='mean' needs mean=mean_image_embedding(model, reference_inputs)")

    def ablate(embed, hook):
        if mode == "zero":
            embed[chosen] = 0.0
        elif mean.ndim == 1:
            embed[chosen] = mean.to(embed.dtype)
        else:
            for b in range(embed.shape[0]):
                if int(image[b].sum()) != mean.shape[0]:
                    raise ValueError(f"row {b} has {int(image[b].sum())} image tokens, the mean has {mean.shape[0]}")
                row = embed[b, image[b]]
                keep = chosen[b][image[b]]
                row[keep] = mean[keep].to(embed.dtype)
                embed[b, image[b]] = row
        return embed

    return model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", ablate)])
