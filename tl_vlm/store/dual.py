"""Extraction from a dual encoder (``HookedCLIP``): each sample's image goes through the vision tower and its
prompt, as a caption, through the text tower (VLM-Lens's ``clip`` model does the same).

Activations are ``[sample, pos, ...]`` in both towers (a sample is one image and one text), so each row is pooled
as VLM-Lens pools it: text positions without padding (``text_mean`` means them all), vision positions all
(``text_mean`` is refused there) but SigLIP 2's padded patches, which are never pooled nor stored. Pooled and
projected embeddings (``hook_pooled``, ``hook_embed_out``) have no positions and are stored as they are.
Over-long prompts are truncated to the text tower's positions, as HF's processor does with ``truncation=True``.
"""

from __future__ import annotations

import torch

from tl_vlm.store.pooling import pool

MULTI_POSITION = ("hook_attn_scores", "hook_pattern")


def extract_dual_batch(model, hooks: list[str], pooling_method: str, float16: bool, loaded) -> list[list[tuple[str, torch.Tensor]]]:
    """Per sample, (hook, pooled activation) pairs."""
    inputs = model.prepare(images=[image for _, image in loaded], text=[sample.prompt for sample, _ in loaded],
                           truncation=True, max_length=model.vlm_cfg.text.n_ctx)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in hooks)
    real = inputs.attention_mask.bool() if inputs.attention_mask is not None else torch.ones_like(inputs.input_ids, dtype=torch.bool)
    patches = inputs.pixel_attention_mask.bool() if inputs.pixel_attention_mask is not None else None  # SigLIP 2
    per_sample: list[list[tuple[str, torch.Tensor]]] = [[] for _ in loaded]
    for hook in hooks:
        act = cache[hook]
        text = hook.startswith("text.")
        for b in range(len(loaded)):
            one = act[b]
            if hook.endswith(MULTI_POSITION) or one.ndim == 1:  # whole patterns; embeddings without positions
                pooled = one[None]
            elif text:
                pooled = pool(one, pooling_method, torch.zeros_like(real[b]), real[b])
            elif patches is not None and not _probe_position(hook):
                pooled = pool(one, pooling_method, None, patches[b])
            else:
                pooled = pool(one, pooling_method, None, None)
            per_sample[b].append((hook, pooled.half() if float16 else pooled))
    return per_sample


def _probe_position(hook: str) -> bool:
    """The pooling head's activations at its one probe position (its keys and values are per patch)."""
    return hook.startswith("vision.head.") and not hook.endswith(("attn.hook_k", "attn.hook_v"))
