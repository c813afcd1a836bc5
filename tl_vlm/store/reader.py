"""Read an activation store (ours or VLM-Lens's) into pandas or stacked tensors, safely."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from tl_vlm.store.io import from_blob
from tl_vlm.store.schema import connect


def load(
    db: str | Path,
    layer: str | None = None,
    image_id: int | None = None,
    run_id: str | None = None,
    stack: bool = False,
) -> pd.DataFrame | dict[str, torch.Tensor]:
    """Rows of ``tensors`` (optionally one layer / image / run) with ``tensor`` decoded.

    ``stack=True`` returns ``{layer: Tensor[row, ...]}`` (rows in id order; shapes must agree per layer).
    """
    conn = connect(db, create=False)
    try:
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
    return {name: torch.cat(list(group["tensor"]), dim=0) for name, group in frame.groupby("layer", sort=False)}
