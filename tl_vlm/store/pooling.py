"""Pooling of one sample's activation over positions, with image and text tokens kept apart."""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

POOLING = ("none", "mean", "max", "last", "image_mean", "text_mean")


def pool(
    act: Tensor, method: str, image: Bool[Tensor, " pos"] | None, real: Bool[Tensor, " pos"] | None
) -> Tensor:
    """``act`` is one sample's ``[pos, ...]`` activation; returns VLM-Lens's shape ``[1, ...]``.

    ``real`` marks non-padding positions and ``image`` image-token positions of a language activation;
    both are None for vision activations (every patch is real, all are image).
    """
    if method not in POOLING:
        raise ValueError(f"unknown pooling {method!r}; choose from {POOLING}")
    keep = real if real is not None else torch.ones(act.shape[0], dtype=torch.bool, device=act.device)
    if method == "image_mean":
        keep = keep & image if image is not None else keep
    elif method == "text_mean":
        if image is None:
            raise ValueError("text_mean pooling needs a language-tower hook; vision activations have no text")
        keep = keep & ~image
    act = act[keep]
    if method == "none":
        return act[None]
    if act.shape[0] == 0:
        raise ValueError(f"{method} pooling over zero positions")
    if method in ("mean", "image_mean", "text_mean"):
        return act.float().mean(0, keepdim=True).to(act.dtype)
    if method == "max":
        return act.max(0, keepdim=True).values
    return act[-1:]
