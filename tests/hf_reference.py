"""Per-layer outputs of the HF reference, captured with forward hooks on its decoder/encoder layers."""

from __future__ import annotations

import torch


def hf_layer_outputs(hf, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits, language layer outputs and vision layer outputs of one HF forward pass."""
    language, vision = [], []
    handles = [
        layer.register_forward_hook(lambda m, i, o: language.append(o[0] if isinstance(o, tuple) else o))
        for layer in hf.model.language_model.layers
    ] + [
        layer.register_forward_hook(lambda m, i, o: vision.append(o[0] if isinstance(o, tuple) else o))
        for layer in hf.model.vision_tower.encoder.layers
    ]
    try:
        with torch.no_grad():
            logits = hf(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, language, vision
