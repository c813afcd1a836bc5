"""Image-text retrieval with hard negatives: what a dual encoder's embeddings can tell apart.

The encoder half of the chart "perception bottleneck" study: before asking where a VLM loses what its vision
encoder holds, measure what the encoder (with its text twin) separates at all. Two measures:

- retrieval over a set of (image, caption) pairs: image-to-text and text-to-image accuracy and recall@k
  (``retrieval_metrics``), text ``i`` being image ``i``'s caption;
- hard negatives: for each image, its caption against the same caption with one attribute swapped (a colour, a
  shape, a position, a chart value, or the two sides of "A higher than B"); accuracy per swap type is how often
  the true caption scores higher (chance: 0.5). Swapped captions share every word but one fact, so bag-of-words
  matching cannot pass them, which is what exposes an encoder's blind spots.

``hard_negatives`` builds both from the toy zoo's synthetic scenes and charts (``zoo/data.py``), whose ground
truth is recorded; ``evaluate`` runs everything on a ``HookedCLIP`` in batches (each image and text embedded once).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.zoo.data import COLOURS, POSITIONS, SHAPES, Example

KINDS = ("colour", "shape", "position", "value", "relation")


@dataclass(frozen=True)
class HardNegative:
    """Image ``image``: ``caption`` is true of it, ``negative`` is the same caption with one ``kind`` swapped."""

    image: int
    caption: str
    negative: str
    kind: str


def _other(rng: random.Random, choices, *exclude) -> str:
    return rng.choice(sorted(set(choices) - set(exclude)))


def scene_caption(obj: dict) -> str:
    return f"a {obj['colour']} {obj['shape']} at the {obj['position']}"


def hard_negatives(examples: Sequence[Example], seed: int = 0) -> tuple[list, list[str], list[HardNegative]]:
    """Images, one caption each (for retrieval) and their hard negatives. Single-shape scenes get colour, shape and
    position swaps ("a red circle at the top left" -> "a blue circle ..."); charts get "A higher than B" ->
    "B higher than A" (relation), a colour swap in it (a colour absent from the chart), and "the A bar is v" ->
    another value (value). Scenes with several shapes, and examples whose caption an earlier one already has, are
    skipped, so caption ``i`` is true of image ``i`` only."""
    rng = random.Random(seed)
    images, captions, negatives = [], [], []
    for example in examples:
        i, before = len(captions), len(negatives)
        if example.kind in ("bar_value", "highest_bar"):
            bars = sorted(rng.sample(example.objects, 2), key=lambda b: -b["value"])
            high, low = bars[0]["colour"], bars[1]["colour"]
            caption = f"the {high} bar is higher than the {low} bar"
            absent = _other(rng, [c for c in COLOURS if c != "white"], *(b["colour"] for b in example.objects))
            bar = rng.choice(example.objects)
            value = f"the {bar['colour']} bar is {bar['value']}"
            wrong = _other(rng, [str(v) for v in range(1, 6)], str(bar["value"]))
            negatives += [
                HardNegative(i, caption, f"the {low} bar is higher than the {high} bar", "relation"),
                HardNegative(i, caption, f"the {absent} bar is higher than the {low} bar", "colour"),
                HardNegative(i, value, f"the {bar['colour']} bar is {wrong}", "value"),
            ]
        elif len(example.objects) == 1:
            obj = example.objects[0]
            caption = scene_caption(obj)
            negatives += [
                HardNegative(i, caption, scene_caption({**obj, "colour": _other(rng, COLOURS, obj["colour"])}), "colour"),
                HardNegative(i, caption, scene_caption({**obj, "shape": _other(rng, SHAPES, obj["shape"])}), "shape"),
                HardNegative(i, caption, scene_caption({**obj, "position": _other(rng, POSITIONS, obj["position"])}),
                             "position"),
            ]
        else:
            continue
        if caption in captions:
            del negatives[before:]
            continue
        images.append(example.image)
        captions.append(caption)
    return images, captions, negatives


def recall_at_k(logits_per_image: Float[Tensor, "image text"], k: int) -> dict[str, float]:
    """Text ``i`` is image ``i``'s match: the fraction of images whose caption is among their ``k`` best texts
    (image-to-text), and of texts whose image is among their ``k`` best images (text-to-image). Ties count against."""
    n = logits_per_image.shape[0]
    if logits_per_image.shape != (n, n):
        raise ValueError(f"recall_at_k needs a square [image, text] matrix (text i matches image i), got {tuple(logits_per_image.shape)}")
    diag = logits_per_image.diagonal()
    i2t = (logits_per_image >= diag[:, None]).sum(1) <= k  # rank of the true text, ties ranked first
    t2i = (logits_per_image >= diag[None, :]).sum(0) <= k
    return {"image_to_text": i2t.float().mean().item(), "text_to_image": t2i.float().mean().item()}


def retrieval_metrics(logits_per_image: Float[Tensor, "image text"], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k in both directions (recall@1 is the retrieval accuracy, always included)."""
    out = {}
    for k in sorted({1, *ks}):
        for direction, value in recall_at_k(logits_per_image, k).items():
            out[f"{direction}_recall@{k}"] = value
    return out


def hard_negative_accuracy(scores: dict[str, Float[Tensor, " pair"]], negatives: Sequence[HardNegative]) -> dict[str, float]:
    """Per swap type, the fraction of pairs whose true caption scores higher than its negative. ``scores`` has
    "caption" and "negative": the image's score with each, one entry per ``negatives`` item."""
    wins = scores["caption"] > scores["negative"]
    out = {}
    for kind in dict.fromkeys(n.kind for n in negatives):
        rows = torch.tensor([n.kind == kind for n in negatives])
        out[kind] = wins[rows].float().mean().item()
    return out


@torch.no_grad()
def embed(model, images: Sequence, texts: Sequence[str], batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Unnormalised image and text embeddings of a ``HookedCLIP``, each image and text once, in batches."""
    image_embeds = [model.encode_image(**model.image_inputs(list(images[i:i + batch_size])))
                    for i in range(0, len(images), batch_size)]
    text_embeds = []
    for i in range(0, len(texts), batch_size):
        batch = model.prepare(text=list(texts[i:i + batch_size]))
        text_embeds.append(model.encode_text(batch.input_ids, batch.attention_mask))
    return torch.cat(image_embeds), torch.cat(text_embeds)


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], ks: Sequence[int] = (1, 5), seed: int = 0,
             batch_size: int = 64) -> pd.DataFrame:
    """Retrieval and hard-negative accuracy of a ``HookedCLIP`` on zoo examples: rows (metric, kind, value)."""
    images, captions, negatives = hard_negatives(examples, seed)
    texts = list(dict.fromkeys([*captions, *(n.caption for n in negatives), *(n.negative for n in negatives)]))
    index = {t: i for i, t in enumerate(texts)}
    image_embeds, text_embeds = embed(model, images, texts, batch_size)
    logits = model.similarity(image_embeds, text_embeds).float()
    rows = [("retrieval", name, value)
            for name, value in retrieval_metrics(logits[:, [index[c] for c in captions]], ks).items()]
    image_rows = torch.tensor([n.image for n in negatives])
    scores = {side: logits[image_rows, torch.tensor([index[getattr(n, side)] for n in negatives])]
              for side in ("caption", "negative")}
    rows += [("hard_negative", kind, value) for kind, value in hard_negative_accuracy(scores, negatives).items()]
    return pd.DataFrame(rows, columns=["metric", "kind", "value"])
