"""VLM-Lens's probe (its ``src/probe``), the same method on the same split, next to tl_vlm's ``probing.probe``.

What VLM-Lens does, and this does: features are one layer's stored tensors (a tensor with more than two dims is
averaged over dim 1, then squeezed); an unstratified 80/20 split of the row indices (``train_test_split``,
``random_state=42``); a torch MLP (``Linear(d, hidden)``, activation, ``num_layers - 2`` hidden ``Linear`` +
activation, ``Linear(hidden, classes)``; default ReLU, 256, 2 layers) trained with AdamW (lr 1e-3), cross-entropy,
10 epochs, batch 32 (any training value given as a list is a grid, chosen by the lowest 5-fold ``KFold``
(shuffled, ``random_state=42``) validation loss on the train split); the control is the same training on the same
split with all labels shuffled; the p-value is the two-sided pooled two-proportion z-test of test vs control
accuracy (statsmodels' ``proportions_ztest``).

Where it cannot be identical, it is seeded: VLM-Lens maps labels to classes in ``set`` order (which changes with
``PYTHONHASHSEED``) and seeds neither torch nor ``random``; here classes are sorted and ``seed`` seeds both. With
the same class order and generator states the two give the same numbers.

tl_vlm's own ``probing.probe`` is a different method: scikit-learn linear / MLP probes with a stratified split,
grid search and a shuffled-label control on the same split.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from tl_vlm.analysis.probing import two_proportion_z_test

MODEL = {"activation": "ReLU", "hidden_size": 256, "num_layers": 2}
TRAINING = {"optimizer": "AdamW", "learning_rate": 1e-3, "loss": "CrossEntropyLoss", "num_epochs": 10, "batch_size": 32}
TEST = {"batch_size": 32, "loss": "CrossEntropyLoss"}


@dataclass
class VLMLensProbeResult:
    train_config: dict  # the chosen training hyperparameters
    test_accuracy: float
    test_loss: float
    shuffle_accuracy: float  # the control: trained and tested on shuffled labels
    shuffle_loss: float
    p_value: float
    classes: list = field(default_factory=list)  # class index -> label


def vlm_lens_features(frame: pd.DataFrame, layer: str) -> tuple[Tensor, list]:
    """One layer's rows of a store (``tl_vlm.store.load``) as VLM-Lens's probe reads them: mean over dim 1 of a
    tensor with more than two dims, squeezed; and the labels."""
    rows = frame[frame["layer"] == layer]
    if rows.empty:
        raise KeyError(f"no rows for layer {layer!r}; the store has {sorted(frame['layer'].unique())}")
    features = [t.mean(dim=1) if t.ndim > 2 else t for t in rows["tensor"]]
    return torch.stack([t.squeeze().float() for t in features]), list(rows["label"])


def _mlp(d_in: int, n_classes: int, model: dict) -> nn.Sequential:
    act = getattr(nn, model["activation"])
    layers = [nn.Linear(d_in, model["hidden_size"]), act()]
    for _ in range(model["num_layers"] - 2):
        layers += [nn.Linear(model["hidden_size"], model["hidden_size"]), act()]
    return nn.Sequential(*layers, nn.Linear(model["hidden_size"], n_classes))


def _train(net: nn.Module, config: dict, train_set, val_set=None) -> float | None:
    optimizer = getattr(torch.optim, config["optimizer"])(net.parameters(), lr=config["learning_rate"])
    loss_fn = getattr(nn, config["loss"])()
    loader = DataLoader(train_set, batch_size=config["batch_size"], shuffle=True)
    for _ in range(config["num_epochs"]):
        net.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(net(x.float()), y).backward()
            optimizer.step()
    if val_set is None:
        return None
    return _evaluate(net, val_set, config["batch_size"], config["loss"])[1]


def _evaluate(net: nn.Module, data, batch_size: int, loss: str) -> tuple[float, float]:
    """Accuracy and mean loss."""
    net.eval()
    loss_fn = getattr(nn, loss)()
    total, correct = 0.0, 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size):
            out = net(x.float())
            total += loss_fn(out, y).item() * x.shape[0]
            correct += int((out.argmax(1) == y).sum())
    return correct / len(data), total / len(data)


def vlm_lens_probe(
    features: Tensor | np.ndarray,
    labels: Sequence,
    model: dict | None = None,
    training: dict | None = None,
    test: dict | None = None,
    seed: int = 0,
) -> VLMLensProbeResult:
    """VLM-Lens's probe on ``features`` [sample, d] and ``labels``; ``model`` / ``training`` / ``test`` are its
    config sections (defaults as VLM-Lens's; a list in ``training`` is a grid)."""
    model, training, test = {**MODEL, **(model or {})}, {**TRAINING, **(training or {})}, {**TEST, **(test or {})}
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    classes = sorted(set(labels), key=str)
    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels])
    torch.manual_seed(seed)
    rng = random.Random(seed)
    _mlp(x.shape[1], len(classes), model)  # VLM-Lens builds one model before anything (same generator use)
    data = TensorDataset(x, y)
    train_idx, test_idx = train_test_split(list(range(len(y))), test_size=0.2, random_state=42)
    train_set, test_set = Subset(data, train_idx), Subset(data, test_idx)

    keys = list(training)
    grid = [dict(zip(keys, values)) for values in itertools.product(*[v if isinstance(v, list) else [v] for v in training.values()])]
    scores = []
    for config in grid:
        folds, weighted = KFold(n_splits=5, shuffle=True, random_state=42), 0.0
        for fold_train, fold_val in folds.split(range(len(train_set))):
            val = Subset(train_set, fold_val)
            weighted += _train(_mlp(x.shape[1], len(classes), model), config, Subset(train_set, fold_train), val) * len(val)
        scores.append(weighted / len(train_set))
    chosen = grid[scores.index(min(scores))]

    shuffled = y.tolist()
    rng.shuffle(shuffled)
    control = TensorDataset(x, torch.tensor(shuffled))
    net = _mlp(x.shape[1], len(classes), model)
    _train(net, chosen, Subset(control, train_idx))
    shuffle_accuracy, shuffle_loss = _evaluate(net, Subset(control, test_idx), test["batch_size"], test["loss"])
    net = _mlp(x.shape[1], len(classes), model)
    _train(net, chosen, train_set)
    test_accuracy, test_loss = _evaluate(net, test_set, test["batch_size"], test["loss"])
    _, p = two_proportion_z_test(test_accuracy, len(test_idx), shuffle_accuracy, len(test_idx))
    return VLMLensProbeResult(chosen, test_accuracy, test_loss, shuffle_accuracy, shuffle_loss, p, classes)
