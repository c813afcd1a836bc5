"""Hard-negative contrastive tuning of a dual encoder (NegCLIP, Yuksekgonul et al. 2023), resumable.

Each batch holds ``B`` images, their captions and one hard negative per image (the caption with one attribute
swapped, ``analysis.retrieval.hard_negatives``). The texts are the ``2B`` captions and negatives:

- CLIP (softmax): image-to-text cross-entropy over all ``2B`` texts plus text-to-image cross-entropy over the ``B``
  images for the true captions (negatives have no image), averaged, as NegCLIP;
- SigLIP (sigmoid): each image-text pair is a binary decision, +1 for the image's caption, -1 for every other text
  including the negatives, summed over texts and averaged over images, as SigLIP's loss.

Batches are drawn from the toy zoo's generator by step index, so a run resumed from its checkpoint (model,
optimizer and step, written atomically every ``save_every`` steps) sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_vlm.analysis.retrieval import HardNegative, hard_negatives
from tl_vlm.zoo import data

CHECKPOINT = "negclip_state.pt"
KINDS = ("colour", "shape", "position", "bar_value", "highest_bar")


def negclip_loss(model, logits_per_image: Float[Tensor, "image two_image"]) -> Float[Tensor, ""]:
    """The loss on ``[B, 2B]`` logits whose first ``B`` texts are the images' captions, the rest hard negatives."""
    n = logits_per_image.shape[0]
    if logits_per_image.shape[1] != 2 * n:
        raise ValueError(f"negclip_loss needs [B, 2B] logits (captions, then negatives), got {tuple(logits_per_image.shape)}")
    logits = logits_per_image.float()
    if model.vlm_cfg.family == "siglip":
        labels = 2 * torch.eye(n, 2 * n, device=logits.device) - 1
        return -F.logsigmoid(labels * logits).sum() / n
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].t(), target)) / 2


def triples(n: int, seed: int, start: int = 0, kinds: Sequence[str] = KINDS) -> tuple[list, list[str], list[str]]:
    """``n`` (image, caption, hard negative) triples, one per distinct image, from examples ``start`` on: each
    image's negative is one of its swaps, chosen by the example's index (so all swap types are trained)."""
    images, captions, negatives = [], [], []
    cursor = start
    while len(images) < n:
        imgs, _, negs = hard_negatives(data.make_examples(n, seed, tuple(kinds), start=cursor), seed=seed + cursor)
        by_image: dict[int, list[HardNegative]] = {}
        for neg in negs:
            by_image.setdefault(neg.image, []).append(neg)
        for i, image in enumerate(imgs):
            if len(images) == n:
                break
            choice = by_image[i][(cursor + i) % len(by_image[i])]
            images.append(image)
            captions.append(choice.caption)
            negatives.append(choice.negative)
        cursor += n
    return images, captions, negatives


def batch_loss(model, images, captions: list[str], negatives: list[str]) -> Float[Tensor, ""]:
    texts = model.prepare(text=[*captions, *negatives])
    image_embeds = model.encode_image(**model.image_inputs(images))
    text_embeds = model.encode_text(texts.input_ids, texts.attention_mask)
    return negclip_loss(model, model.similarity(image_embeds, text_embeds))


def tune_negclip(
    model,
    steps: int,
    checkpoint_dir: str | os.PathLike,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    save_every: int = 50,
    towers: Sequence[str] = ("vision", "text"),
    kinds: Sequence[str] = KINDS,
    progress: bool = True,
) -> list[float]:
    """Tune ``model`` (a ``HookedCLIP``, in place) for ``steps`` steps with the NegCLIP loss; ``towers`` (and the
    logit scale / bias) are trained, the rest frozen. Resumes from ``checkpoint_dir`` when it holds a checkpoint of
    an earlier run; returns the losses of the steps run now. ``model.save_pretrained`` saves the result."""
    trained = [p for name, p in model.named_parameters() if name.split(".")[0] in (*towers, "logit_scale", "logit_bias")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    path = pathlib.Path(checkpoint_dir) / CHECKPOINT
    start = 0
    if path.exists():
        state = torch.load(path, map_location=model.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    path.parent.mkdir(parents=True, exist_ok=True)
    losses = []
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="NegCLIP", disable=not progress)
    for step in bar:
        loss = batch_loss(model, *triples(batch_size, seed, start=step * batch_size, kinds=kinds))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            tmp = path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, path)  # a run killed mid-write keeps its previous checkpoint
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
