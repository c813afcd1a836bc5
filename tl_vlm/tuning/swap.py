"""Swap a (tuned) dual-encoder vision tower into a LLaVA-family VLM (or a VLM's into a dual encoder), then retrain
only the projector.

The chart-perception study's second step: after hard-negative tuning improves what the encoder tells apart, put it
into the VLM and retrain the projector (the encoder and language model stay frozen, as in LLaVA's first stage), to
see whether the VLM's answers follow. ``with_vision_encoder`` returns a new HookedVLM whose vision tower holds the
dual encoder's ViT weights (its pooling head and projection are not part of a VLM's encoder and stay behind);
``train_projector`` trains the projector on the toy zoo's question answering, loss on the answer tokens only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tl_vlm.prompts import format_prompt
from tl_vlm.towers.vision import ViTTower
from tl_vlm.zoo import data

# ViT fields that must agree for one tower's weights to mean the same in the other.
_SAME = ("n_layers", "d_model", "n_heads", "d_mlp", "act_fn", "eps", "image_size", "patch_size", "num_channels",
         "class_token", "patch_bias", "ln_pre", "ln_post", "attn_bias")
_VIT_PARTS = ("embed.", "ln_pre.", "blocks.")


def with_vision_encoder(model, encoder):
    """A copy of ``model`` whose vision tower has the ViT weights (embeddings, ``ln_pre``, blocks) of ``encoder``.
    Either way round: ``model`` a HookedVLM with a ViT vision tower (LLaVA, LLaVA-NeXT, OneVision) and ``encoder`` a
    (tuned) ``HookedCLIP``; or ``model`` a ``HookedCLIP`` (a text twin) and ``encoder`` the VLM, to measure the VLM's
    own encoder with retrieval. Pooling heads and projections stay the model's own; so does its image processor,
    which must agree with the encoder's."""
    source, target = encoder.vision, model.vision
    if not isinstance(target, ViTTower) or not isinstance(source, ViTTower):
        raise TypeError(f"{type(model).__name__} or {type(encoder).__name__} has no ViT vision tower; only ViTs swap")
    differ = {f: (getattr(target.cfg, f), getattr(source.cfg, f)) for f in _SAME
              if getattr(target.cfg, f) != getattr(source.cfg, f)}
    if differ:
        raise ValueError(f"the encoder's ViT does not fit the model's vision tower (model, encoder): {differ}")
    swapped = copy.deepcopy(model)
    theirs = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in swapped.vision.named_parameters():
            if name.startswith(_VIT_PARTS):
                param.copy_(theirs[name])
    return swapped


def _batch(vlm, examples: Sequence[data.Example]):
    """Prompt + answer + end of sequence, right-padded; labels mark the answer (and end) tokens."""
    processor = vlm.processor
    prompts = [format_prompt(processor, ex.question) for ex in examples]
    eos = processor.tokenizer.eos_token
    images = [ex.image for ex in examples]
    full = vlm.prepare(images=images, text=[f"{p} {ex.answer}{eos}" for p, ex in zip(prompts, examples)],
                       padding_side="right")
    prompt_lengths = processor(images=images, text=prompts, return_tensors="pt", padding=True,
                               padding_side="right")["attention_mask"].sum(1, keepdim=True)
    answer = torch.arange(full.input_ids.shape[1])[None] >= prompt_lengths
    return full, answer.to(full.input_ids.device) & full.attention_mask.bool()


def answer_loss(vlm, examples: Sequence[data.Example]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the image and question."""
    inputs, answer = _batch(vlm, examples)
    logits = vlm(inputs)[:, :-1].float()
    targets, keep = inputs.input_ids[:, 1:], answer[:, 1:]
    return F.cross_entropy(logits[keep], targets[keep])


def train_projector(vlm, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    kinds: Sequence[str] = data.QUESTION_TYPES, progress: bool = True) -> list[float]:
    """Train only ``vlm.projector`` (in place) on the toy zoo's questions; returns the losses."""
    for name, p in vlm.named_parameters():
        p.requires_grad_(name.startswith("projector."))
    optimizer = torch.optim.AdamW(vlm.projector.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    bar = tqdm(range(steps), desc="projector", disable=not progress)
    for step in bar:
        loss = answer_loss(vlm, data.make_examples(batch_size, seed, tuple(kinds), start=step * batch_size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for p in vlm.parameters():
        p.requires_grad_(True)
    return losses
