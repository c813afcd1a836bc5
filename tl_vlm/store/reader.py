"""Read an activation store (ours or VLM-Lens's) into pandas or stacked tensors, safely."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from tl_vlm.store.io import from_blob
from tl_vlm.store.schema import StoreError, connect


def load(
    db: str | Path,
    layer: str | None = None,
    image_id: int | str | None = None,
    run_id: str | None = None,
    stack: bool = False,
) -> pd.DataFrame | dict[str, torch.Tensor]:
    """Rows of ``tensors`` (optionally one layer / image / run) with ``tensor`` decoded.

    ``stack=True`` returns ``{layer: Tensor[row, ...]}`` (rows in id order; shapes must agree per layer).
    The file is opened read-only, so a finished store can be read from a read-only location.
    """
    conn = connect(db, create=False)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tensors'").fetchone():
            raise StoreError(f"{db} is an empty SQLite file (no 'tensors' table); not an activation store yet")
        query, params = "SELECT t.* FROM tensors t", []
        if run_id is not None:
            query += " JOIN tensor_samples s ON s.tensor_id = t.id"
        clauses = []
        for column, value in (("t.layer", layer), ("t.image_id", image_id), ("s.run_id", run_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        frame = pd.read_sql(query + " ORDER BY t.id", conn, params=params)
    finally:
        conn.close()
    frame["tensor"] = [from_blob(blob) for blob in frame["tensor"]]
    if not stack:
        return frame
    return {name: _stack(name, list(group["tensor"])) for name, group in frame.groupby("layer", sort=False)}


def _stack(layer: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"layer {layer}: rows have shapes {sorted(shapes)[:4]} after the first axis, which cannot be stacked; "
            "load with stack=False (e.g. unpooled activations of prompts of different lengths)"
        )
    return torch.cat(tensors, dim=0)
