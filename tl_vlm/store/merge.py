"""Merge shard stores (e.g. one per torchrun rank) into one, never duplicating a finished sample.

A sample finished in the target and in a source with different image fingerprints (the image file changed
between the two runs) takes the source's rows: sources are merged in order, the later extraction wins.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from tl_vlm.store.lock import writer_lock
from tl_vlm.store.schema import StoreError, connect, done_samples, drop_sample, finish, has_side_tables, read_only_uri

_ROW = ("t.name, t.architecture, t.timestamp, t.image_path, t.image_id, t.prompt, t.label, t.layer, t.pooling_method, "
        "t.tensor_dim, t.tensor")


def merge(target: str | Path, sources: list[str | Path], lock: bool = True) -> int:
    """Copy every sample finished in ``sources`` and not yet in ``target``; returns tensor rows copied.

    ``lock=False`` only for a caller that already holds the target's writer lock."""
    for source in sources:
        _check_source(Path(source), Path(target))
    with writer_lock(target) if lock else contextlib.nullcontext():
        conn = connect(target)
        copied = 0
        try:
            for source in sources:
                conn.execute("ATTACH DATABASE ? AS src", (read_only_uri(source),))
                try:
                    with conn:
                        copied += _copy(conn)
                finally:
                    conn.execute("DETACH DATABASE src")
            finish(conn)
        finally:
            conn.close()
    return copied


def _check_source(source: Path, target: Path) -> None:
    if source.resolve() == target.resolve():
        raise StoreError(f"cannot merge {source} into itself")
    conn = connect(source, create=False)
    try:
        if not has_side_tables(conn):
            raise StoreError(
                f"{source} has no samples_done / tensor_samples tables (an empty file, or a VLM-Lens store); merge "
                "copies tl_vlm stores, whose side tables say which rows make up each finished sample"
            )
    finally:
        conn.close()


def _copy(conn) -> int:
    """One source (attached as ``src``) into the target, in the caller's transaction."""
    copied = 0
    conn.execute("INSERT OR IGNORE INTO runs SELECT * FROM src.runs")
    for (run_id,) in conn.execute("SELECT DISTINCT run_id FROM src.samples_done").fetchall():
        have = done_samples(conn, run_id)
        for key, stamp in done_samples(conn, run_id, "src").items():
            if key in have and (stamp is None or have[key] is None or stamp == have[key]):
                continue
            drop_sample(conn, run_id, key)  # only when the image changed since the target's rows
            rows = conn.execute(
                f"SELECT {_ROW} FROM src.tensors t JOIN src.tensor_samples s ON s.tensor_id = t.id "
                "WHERE s.run_id = ? AND s.sample_key = ? ORDER BY t.id",
                (run_id, key),
            ).fetchall()
            for row in rows:
                cursor = conn.execute(
                    "INSERT INTO tensors (name, architecture, timestamp, image_path, image_id, prompt, label, layer, "
                    "pooling_method, tensor_dim, tensor) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                conn.execute("INSERT INTO tensor_samples VALUES (?,?,?)", (cursor.lastrowid, run_id, key))
            conn.execute("INSERT INTO samples_done VALUES (?,?,?)", (run_id, key, stamp))
            conn.execute("DELETE FROM errors WHERE run_id = ? AND sample_key = ?", (run_id, key))
            copied += len(rows)
    conn.execute("INSERT OR IGNORE INTO errors SELECT * FROM src.errors")
    return copied
