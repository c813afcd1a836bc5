"""Probing pooled activations: linear and MLP probes with grid search and k-fold CV, a control task with
shuffled labels, selectivity, a two-proportion z-test, and a layer sweep vision -> (Q-Former) -> projector ->
language on the same labels (where information is present, and where the model stops using it).

Features come from a live model (``pooled_activations``) or from activation-store rows (``store_features``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from tl_vlm.analysis.logit_lens import image_positions
from tl_vlm.inputs import VLMInputs

LanguagePool = Literal["last", "mean", "image_mean", "text_mean"]

GRIDS = {
    "linear": {"logisticregression__C": [0.01, 0.1, 1.0, 10.0]},
    "mlp": {"mlpclassifier__hidden_layer_sizes": [(64,), (128,)], "mlpclassifier__alpha": [1e-4, 1e-2]},
}


def two_proportion_z_test(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """z and two-sided p-value of H0 "same proportion", with the pooled proportion's standard error."""
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class ProbeResult:
    accuracy: float
    control_accuracy: float
    selectivity: float  # accuracy - control accuracy
    z: float
    p_value: float  # probe vs control accuracy on the test set
    best_params: dict
    n_test: int


def _estimator(kind: str, seed: int):
    if kind == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if kind == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(max_iter=1000, random_state=seed))
    raise ValueError(f"kind is 'linear' or 'mlp', not {kind!r}")


def _fit(kind, grid, folds, seed, x_train, y_train):
    search = GridSearchCV(_estimator(kind, seed), grid or GRIDS[kind], cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return search.fit(x_train, y_train)


def probe(
    features: Float[Tensor, "sample d"] | np.ndarray,
    labels: Sequence,
    kind: Literal["linear", "mlp"] = "linear",
    grid: dict | None = None,
    folds: int = 5,
    test_size: float = 0.25,
    seed: int = 0,
) -> ProbeResult:
    """Grid search with k-fold CV on a stratified train split, accuracy on the held-out split; the control
    task is the same search on the same split with the labels shuffled (what the probe can fit from noise)."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels)
    train, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)
    search = _fit(kind, grid, folds, seed, x[train], y[train])
    accuracy = float(search.score(x[test], y[test]))
    shuffled = np.random.default_rng(seed).permutation(y)
    control = float(_fit(kind, grid, folds, seed, x[train], shuffled[train]).score(x[test], shuffled[test]))
    z, p = two_proportion_z_test(accuracy, len(test), control, len(test))
    return ProbeResult(accuracy, control, accuracy - control, z, p, search.best_params_, len(test))


def _pool_language(act: Tensor, inputs: VLMInputs, model, pool: LanguagePool) -> Tensor:
    ids = inputs.input_ids.to(act.device)
    real = inputs.attention_mask.to(act.device).bool() if inputs.attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    if pool == "last":  # the last real position, whatever the padding side
        return act[torch.arange(act.shape[0]), (real * torch.arange(real.shape[1], device=act.device)).argmax(-1)]
    image = image_positions(model, ids)
    keep = {"mean": real, "image_mean": image & real, "text_mean": ~image & real}[pool]
    return (act * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


def _pool_rows(act: Tensor, inputs: VLMInputs, model, hook: str) -> Tensor:
    # Vision / Q-Former / projector activations are [image, patch, d]: mean over a row's real patches.
    if act.shape[0] != inputs.input_ids.shape[0]:
        raise ValueError(f"{hook} has {act.shape[0]} rows for {inputs.input_ids.shape[0]} samples; probe one image per sample")
    valid = model.padded_rows(inputs, hook) if model.capabilities.padded_vision_rows else None
    if valid is None:
        return act.mean(1)
    valid = valid.to(act.device)  # rows padded to the largest image (Qwen-VL, Pixtral): the real positions only
    return (act * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)


def pooled_activations(
    model, inputs: Sequence[VLMInputs], hooks: Sequence[str], language_pool: LanguagePool = "last"
) -> dict[str, Float[Tensor, "sample d"]]:
    """One pooled vector per sample (batch row) for each hook: language hooks by ``language_pool``, other
    towers' hooks by the mean over the row's patches / queries / tokens."""
    from tl_vlm.hooked_vlm import HookedVLM

    if not isinstance(model, HookedVLM):
        raise TypeError(
            f"pooled_activations pools a HookedVLM's towers, got {type(model).__name__}; for a dual encoder "
            "(HookedCLIP) extract with tl_vlm.store (`tl-vlm extract`), which pools its real tokens and patches, and "
            "probe the stored features (probing.store_features)"
        )
    pooled: dict[str, list[Tensor]] = {hook: [] for hook in hooks}
    with torch.no_grad():
        for batch in inputs:
            _, cache = model.run_with_cache(batch, names_filter=list(hooks))
            for hook in hooks:
                act = cache[hook]
                language = hook.startswith(("blocks.", "hook_", "ln_final"))
                pooled[hook].append((_pool_language(act, batch, model, language_pool) if language else _pool_rows(act, batch, model, hook)).float().cpu())
    return {hook: torch.cat(rows) for hook, rows in pooled.items()}


def store_features(frame: pd.DataFrame, layer: str) -> tuple[Float[Tensor, "sample d"], pd.DataFrame]:
    """Features of one hook from ``tl_vlm.store.load`` rows (pooled at extraction), flattened per row, with the
    rows they came from (for their labels)."""
    rows = frame[frame["layer"] == layer]
    if rows.empty:
        raise KeyError(f"no rows for layer {layer!r}; the store has {sorted(frame['layer'].unique())}")
    return torch.stack([t.float().reshape(-1) for t in rows["tensor"]]), rows


def sweep_hooks(model) -> pd.DataFrame:
    """The towers' output streams in processing order: vision blocks, Q-Former blocks, projector, language blocks."""
    rows = []
    towers = model.towers()
    if "vision" in towers:
        rows += [("vision", i, f"vision.blocks.{i}.hook_resid_post") for i in range(towers["vision"].cfg.n_layers)]
    if "qformer" in towers:
        rows += [("qformer", i, f"qformer.blocks.{i}.hook_normalized_resid_post") for i in range(towers["qformer"].cfg.n_layers)]
    rows.append(("projector", 0, "projector.hook_out"))
    language = "language" if "language" in towers else "encoder"
    prefix = "" if language == "language" else "encoder."
    rows += [(language, i, f"{prefix}blocks.{i}.hook_resid_post") for i in range(towers[language].cfg.n_layers)]
    return pd.DataFrame(rows, columns=["tower", "layer", "hook"])


def layer_sweep(
    model,
    inputs: Sequence[VLMInputs],
    labels: Sequence,
    hooks: Sequence[str] | None = None,
    kind: Literal["linear", "mlp"] = "linear",
    language_pool: LanguagePool = "last",
    **probe_kwargs,
) -> pd.DataFrame:
    """A probe (and its control) per hook, on the same labels: one row per hook with tower, layer and the
    ``ProbeResult`` fields. Default hooks: ``sweep_hooks(model)``."""
    table = sweep_hooks(model) if hooks is None else pd.DataFrame({"tower": None, "layer": range(len(hooks)), "hook": list(hooks)})
    features = pooled_activations(model, inputs, list(table["hook"]), language_pool)
    results = [asdict(probe(features[hook], labels, kind, **probe_kwargs)) for hook in table["hook"]]
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(results)], axis=1)


def answer_accuracy(model, inputs: Sequence[VLMInputs], answers: Sequence[str]) -> float:
    """How often the model's greedy answer starts with the sample's answer (word by word, case-insensitive): the
    number to compare a layer sweep against. Whole words, not first tokens: SentencePiece tokenizers give every
    number the same first token ("▁"). Batches must be left-padded, as for ``generate``."""
    answers = list(answers)
    hits, start = [], 0
    with torch.no_grad():
        for batch in inputs:
            mask = batch.attention_mask
            if mask is not None and not bool(mask[:, -1].all()):
                raise ValueError("answer_accuracy generates answers: pad the batches on the left (padding_side='left')")
            expected = [_words(a) for a in answers[start : start + len(batch.input_ids)]]
            start += len(expected)
            longest = max(len(model.tokenizer.encode(" ".join(w), add_special_tokens=False)) for w in expected)
            tokens = model.generate(batch, max_new_tokens=longest + 1)
            texts = model.tokenizer.batch_decode(tokens[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            hits += [_words(text)[: len(want)] == want for text, want in zip(texts, expected)]
    if start != len(answers):
        raise ValueError(f"{len(answers)} answers for {start} samples")
    return float(np.mean(hits))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
