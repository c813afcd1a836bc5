"""Hallucination classification with internal confidence: find object mentions in captions, label them
real or hallucinated against the image's objects, score each with c(o), report AUROC and average precision.

    mentions = extract_mentions(captions, {"dog": ["dog", "puppy"], "hot dog": ["hot dog"]})
    mentions = label_mentions(mentions, truth=[{"dog"}, {"cat"}])      # adds "hallucinated"
    mentions = score_mentions(model, mentions, inputs_per_caption)      # adds "confidence"
    hallucination_metrics(mentions["confidence"], mentions["hallucinated"])  # {"auroc": ..., "ap": ...}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from tl_vlm.analysis.confidence import internal_confidence
from tl_vlm.inputs import VLMInputs


def extract_mentions(captions: Sequence[str], vocabulary: Mapping[str, Iterable[str]] | Iterable[str]) -> pd.DataFrame:
    """One row per mention: caption index, object, the surface word, its character span.

    ``vocabulary`` maps each object to its surface forms (synonyms), or is a plain list of objects (each its own
    form). Matching is case-insensitive on word boundaries, plurals ("-s", "-es", "-y" -> "-ies") included; longer
    forms win, so "hot dog" is one mention of "hot dog", not also one of "dog"."""
    forms = vocabulary.items() if isinstance(vocabulary, Mapping) else ((word, [word]) for word in vocabulary)
    owner = {surface: obj for obj, words in forms for form in words for surface in _inflections(form.lower())}
    alternatives = "|".join(re.escape(form) for form in sorted(owner, key=len, reverse=True))
    pattern = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)
    rows = [
        dict(caption=i, object=owner[match.group(0).lower()], word=match.group(0), start=match.start(), end=match.end())
        for i, caption in enumerate(captions)
        for match in pattern.finditer(caption)
    ]
    return pd.DataFrame(rows, columns=["caption", "object", "word", "start", "end"])


def _inflections(form: str) -> list[str]:
    plurals = [form + "s", form + "es"] + ([form[:-1] + "ies"] if form.endswith("y") else [])
    return [form, *plurals]


def label_mentions(mentions: pd.DataFrame, truth: Sequence[Iterable[str]]) -> pd.DataFrame:
    """Adds ``hallucinated``: the mentioned object is not among caption i's ground-truth objects ``truth[i]``."""
    present = [set(objects) for objects in truth]
    return mentions.assign(hallucinated=[obj not in present[c] for c, obj in zip(mentions["caption"], mentions["object"])])


def score_mentions(
    model, mentions: pd.DataFrame, inputs: Sequence[VLMInputs], normed: bool = False, top_k: int | None = 50
) -> pd.DataFrame:
    """Adds ``confidence`` = c(word) on ``inputs[caption]`` (the image and prompt the caption came from, one row each).
    The mentioned surface word is scored, as the paper scores the generated word."""
    scores = pd.Series(np.nan, index=mentions.index)
    for caption, group in mentions.groupby("caption"):
        words = list(dict.fromkeys(group["word"]))
        values = internal_confidence(model, inputs[caption], words, normed, top_k)[0].tolist()
        scores[group.index] = group["word"].map(dict(zip(words, values)))
    return mentions.assign(confidence=scores.astype(float))


def hallucination_metrics(confidence: Sequence[float], hallucinated: Sequence[bool]) -> dict[str, float]:
    """AUROC and average precision of detecting hallucinations (the positive class) by LOW confidence."""
    labels, scores = np.asarray(hallucinated, dtype=bool), -np.asarray(confidence, dtype=float)
    if labels.all() or not labels.any():
        raise ValueError("need both real and hallucinated mentions")
    return {"auroc": float(roc_auc_score(labels, scores)), "ap": float(average_precision_score(labels, scores))}
