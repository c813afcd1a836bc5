"""Concept geometry of pooled activations (from ``probing.pooled_activations`` or store rows): PCA (on one set, or
fitted on one set and projecting another), cosine similarity to concept centroids, and weighted k-NN concept votes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.decomposition import PCA
from torch import Tensor


def pca(features: Float[Tensor, "sample d"] | np.ndarray, n_components: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """Coordinates on the first principal components (columns pc1, pc2, ...) and each one's explained variance ratio."""
    fitted = PCA(n_components=n_components)
    coords = fitted.fit_transform(np.asarray(features, dtype=np.float64))
    return pd.DataFrame(coords, columns=[f"pc{i + 1}" for i in range(n_components)]), fitted.explained_variance_ratio_


@dataclass
class FittedPCA:
    """Principal components fitted on some features (``fit_pca``), to project others onto: VLM-Lens fits on concept
    images and projects held-out targets."""

    model: PCA

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.model.explained_variance_ratio_

    def transform(self, features: Float[Tensor, "sample d"] | np.ndarray) -> pd.DataFrame:
        """Coordinates of ``features`` on the fitted components (columns pc1, pc2, ...)."""
        coords = self.model.transform(np.asarray(features, dtype=np.float64))
        return pd.DataFrame(coords, columns=[f"pc{i + 1}" for i in range(coords.shape[1])])


def fit_pca(features: Float[Tensor, "sample d"] | np.ndarray, n_components: int = 2) -> FittedPCA:
    """Principal components of ``features``; ``.transform`` projects these or held-out features onto them."""
    return FittedPCA(PCA(n_components=n_components).fit(np.asarray(features, dtype=np.float64)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def concept_centroids(features, concepts: Sequence) -> pd.DataFrame:
    """Mean feature vector of each concept (rows indexed by concept)."""
    return pd.DataFrame(np.asarray(features, dtype=np.float64)).groupby(np.asarray(concepts)).mean()


def centroid_cosine(features, centroids: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity of each sample (row) to each concept centroid (column)."""
    sims = _unit(np.asarray(features, dtype=np.float64)) @ _unit(centroids.to_numpy()).T
    return pd.DataFrame(sims, columns=centroids.index)


def knn_votes(reference, concepts: Sequence, queries, k: int = 5) -> pd.DataFrame:
    """For each query, its k most cosine-similar reference samples vote for their concepts with weight = their
    similarity (negative similarities vote 0); votes are normalised to sum to 1 (uniform if all weights are 0)."""
    concepts = np.asarray(concepts)
    names = np.unique(concepts)
    sims = _unit(np.asarray(queries, dtype=np.float64)) @ _unit(np.asarray(reference, dtype=np.float64)).T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((sims.shape[0], len(names)))
    for q, neighbours in enumerate(nearest):
        for n in neighbours:
            votes[q, np.searchsorted(names, concepts[n])] += max(sims[q, n], 0.0)
    total = votes.sum(1, keepdims=True)
    votes = np.where(total > 0, votes / np.where(total > 0, total, 1), 1 / len(names))
    return pd.DataFrame(votes, columns=names)
