"""Mllama's tile-aware embeddings: learned per-aspect-ratio vectors for each tile, mixed in through tanh gates.

An image is cut into up to ``max_num_tiles`` tiles on a canvas whose shape (e.g. 1x2 tiles) is one of the
supported aspect ratios; its id (1-based, 0 = no image) picks a row of each table. ``AspectRatioEmbedding`` adds
one vector per tile (before the class token, and again before the global layers); ``TiledPositionEmbedding``
blends a shared per-patch table with a per-(aspect ratio, tile, patch) table by its gate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


class AspectRatioEmbedding(nn.Module):
    """``x + tanh(gate) * W[aspect_ratio_id]``, one vector per tile (HF's ``MllamaPrecomputedAspectRatioEmbedding``)."""

    def __init__(self, n_aspect_ratios: int, max_num_tiles: int, d_model: int):
        super().__init__()
        self.max_num_tiles, self.d_model = max_num_tiles, d_model
        self.W = nn.Parameter(torch.empty(n_aspect_ratios + 1, max_num_tiles * d_model))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, aspect_ratio_ids: Int[Tensor, " image"]) -> Float[Tensor, "image tile 1 d_model"]:
        """The gated vectors, to be added to ``[image, tile, pos, d_model]`` activations."""
        table = F.embedding(aspect_ratio_ids, self.W).reshape(-1, self.max_num_tiles, 1, self.d_model)
        return table * self.gate.tanh()


class TiledPositionEmbedding(nn.Module):
    """``(1 - tanh(gate)) * W_pos`` for every tile plus ``tanh(gate) * W_tile[aspect_ratio_id]`` per tile and
    position (HF's ``MllamaPrecomputedPositionEmbedding``); positions count the class token."""

    def __init__(self, n_aspect_ratios: int, max_num_tiles: int, n_positions: int, d_model: int):
        super().__init__()
        self.max_num_tiles, self.n_positions, self.d_model = max_num_tiles, n_positions, d_model
        self.W_pos = nn.Parameter(torch.empty(n_positions, d_model))
        self.W_tile = nn.Parameter(torch.empty(n_aspect_ratios + 1, max_num_tiles * n_positions * d_model))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: Float[Tensor, "image tile pos d_model"], aspect_ratio_ids: Int[Tensor, " image"]
    ) -> Float[Tensor, "image tile pos d_model"]:
        """``x`` with both embeddings added, in HF's order (the sum rounds as HF's in half precision)."""
        x = x + ((1 - self.gate.tanh()) * self.W_pos).view(1, 1, self.n_positions, self.d_model)
        tile = F.embedding(aspect_ratio_ids, self.W_tile).reshape(-1, self.max_num_tiles, self.n_positions, self.d_model)
        return x + self.gate.tanh() * tile
