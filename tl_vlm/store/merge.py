"""Merge shard stores (e.g. one per torchrun rank) into one, never duplicating a finished sample."""

from __future__ import annotations

from pathlib import Path

from tl_vlm.store.schema import connect


def merge(target: str | Path, sources: list[str | Path]) -> int:
    """Copy every sample finished in ``sources`` and not yet in ``target``; returns tensor rows copied."""
    conn = connect(target)
    copied = 0
    try:
        for source in sources:
            connect(source, create=False).close()  # refuse foreign files before attaching
            conn.execute("ATTACH DATABASE ? AS src", (str(source),))
            try:
                with conn:
                    conn.execute("INSERT OR IGNORE INTO runs SELECT * FROM src.runs")
                    new = conn.execute(
                        "SELECT d.run_id, d.sample_key FROM src.samples_done d WHERE NOT EXISTS "
                        "(SELECT 1 FROM samples_done m WHERE m.run_id = d.run_id AND m.sample_key = d.sample_key)"
                    ).fetchall()
                    for run_id, key in new:
                        rows = conn.execute(
                            "SELECT t.name, t.architecture, t.timestamp, t.image_path, t.image_id, t.prompt, t.label, "
                            "t.layer, t.pooling_method, t.tensor_dim, t.tensor FROM src.tensors t JOIN src.tensor_samples s "
                            "ON s.tensor_id = t.id WHERE s.run_id = ? AND s.sample_key = ? ORDER BY t.id",
                            (run_id, key),
                        ).fetchall()
                        for row in rows:
                            cursor = conn.execute(
                                "INSERT INTO tensors (name, architecture, timestamp, image_path, image_id, prompt, label, "
                                "layer, pooling_method, tensor_dim, tensor) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                row,
                            )
                            conn.execute("INSERT INTO tensor_samples VALUES (?,?,?)", (cursor.lastrowid, run_id, key))
                        conn.execute("INSERT INTO samples_done VALUES (?,?)", (run_id, key))
                        conn.execute("DELETE FROM errors WHERE run_id = ? AND sample_key = ?", (run_id, key))
                        copied += len(rows)
                    conn.execute("INSERT OR IGNORE INTO errors SELECT * FROM src.errors")
            finally:
                conn.execute("DETACH DATABASE src")
    finally:
        conn.close()
    return copied
