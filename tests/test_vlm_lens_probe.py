"""VLM-Lens's probe method next to tl_vlm's, and PCA fitted on one set and projecting another."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tl_vlm.analysis.geometry import fit_pca, pca
from tl_vlm.analysis.vlm_lens_probe import vlm_lens_features, vlm_lens_probe


def blobs(n: int, d: int, gap: float, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = ["red" if i % 2 else "blue" for i in range(n)]
    x = rng.normal(size=(n, d)) + np.array([[gap if label == "red" else -gap] + [0] * (d - 1) for label in labels])
    return x.astype(np.float32), labels


def test_probe_separates_what_is_there_and_not_shuffled_labels():
    x, labels = blobs(60, 4, 3.0, seed=0)
    result = vlm_lens_probe(x, labels, training={"num_epochs": [4, 12], "batch_size": 16})
    assert result.test_accuracy >= 0.9 and result.shuffle_accuracy <= 0.75 and result.p_value < 0.05
    assert result.train_config["num_epochs"] in (4, 12) and result.classes == ["blue", "red"]
    again = vlm_lens_probe(x, labels, training={"num_epochs": [4, 12], "batch_size": 16})
    assert again == result  # seeded: VLM-Lens seeds nothing, tl_vlm seeds torch and the label shuffle


def test_probe_on_noise_is_at_chance():
    x, _ = blobs(60, 4, 0.0, seed=1)
    labels = ["red" if v else "blue" for v in np.random.default_rng(2).integers(0, 2, 60)]
    result = vlm_lens_probe(x, labels)
    assert result.test_accuracy <= 0.8 and result.p_value > 0.01


def test_features_are_read_as_vlm_lens_reads_them():
    """Unpooled rows ([1, pos, d]) are averaged over dim 1, pooled ones ([1, d]) squeezed; other layers ignored."""
    unpooled = [torch.randn(1, 5, 4) for _ in range(3)]
    frame = pd.DataFrame({"layer": ["a", "a", "b", "a"], "tensor": [unpooled[0], unpooled[1], torch.ones(1, 4), unpooled[2]],
                          "label": ["x", "y", "z", "x"]})
    features, labels = vlm_lens_features(frame, "a")
    assert torch.allclose(features, torch.stack([t.mean(1).squeeze() for t in unpooled])) and labels == ["x", "y", "x"]
    with pytest.raises(KeyError, match="no rows for layer"):
        vlm_lens_features(frame, "c")


def test_pca_fit_then_transform_held_out():
    rng = np.random.default_rng(0)
    concepts, targets = rng.normal(size=(30, 5)), rng.normal(size=(7, 5))
    fitted = fit_pca(concepts, n_components=3)
    same, ratio = pca(concepts, n_components=3)
    assert np.allclose(fitted.transform(concepts).to_numpy(), same.to_numpy()) and np.allclose(fitted.explained_variance_ratio, ratio)
    # the held-out projection is onto the concepts' components, centred on the concepts' mean
    centred = targets - concepts.mean(0)
    basis = np.linalg.svd(concepts - concepts.mean(0), full_matrices=False)[2][:3]
    projected = fitted.transform(targets).to_numpy()
    assert list(fitted.transform(targets).columns) == ["pc1", "pc2", "pc3"]
    assert np.allclose(np.abs(projected), np.abs(centred @ basis.T))
