"""The SQLite layout: VLM-Lens's ``tensors`` table, exactly, plus tl_vlm's bookkeeping tables.

VLM-Lens readers (``pandas.read_sql("SELECT * FROM tensors", conn)`` then
``torch.load(io.BytesIO(blob))``) work on our files unchanged. The side tables record what is
needed to reproduce a run (``runs``), which dataset rows a run has finished (``samples_done``, written
in the same transaction as their tensors, so a killed run leaves no partial batch and resumes
where it stopped), which ``tensors`` rows belong to which sample (``tensor_samples``, for merging
shards without duplicates) and unreadable inputs (``errors``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

TENSORS = """CREATE TABLE IF NOT EXISTS tensors (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    architecture TEXT NOT NULL,
    timestamp DATETIME DEFAULT CURRENT_TIMESTAMP,
    image_path TEXT NULL,
    image_id INTEGER NULL,
    prompt TEXT NOT NULL,
    label TEXT NULL,
    layer TEXT NOT NULL,
    pooling_method TEXT NULL,
    tensor_dim INTEGER NOT NULL,
    tensor BLOB NOT NULL
)"""
SIDE_TABLES = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, model TEXT NOT NULL, revision TEXT, config_hash TEXT NOT NULL,
        tl_vlm_version TEXT NOT NULL, dtype TEXT NOT NULL, pooling TEXT NOT NULL, hooks TEXT NOT NULL,
        config TEXT NOT NULL, created DATETIME DEFAULT CURRENT_TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS samples_done (
        run_id TEXT NOT NULL, sample_key TEXT NOT NULL, PRIMARY KEY (run_id, sample_key))""",
    """CREATE TABLE IF NOT EXISTS tensor_samples (
        tensor_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, sample_key TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS errors (
        run_id TEXT NOT NULL, sample_key TEXT NOT NULL, image_path TEXT, reason TEXT NOT NULL,
        timestamp DATETIME DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (run_id, sample_key))""",
]
TENSOR_COLUMNS = [
    "id", "name", "architecture", "timestamp", "image_path", "image_id", "prompt", "label", "layer",
    "pooling_method", "tensor_dim", "tensor",
]


class StoreError(ValueError):
    """The file is not an activation store we can use."""


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """Open (or create) a store; a file that is not SQLite, or SQLite without our table, is refused."""
    path = Path(path)
    if not path.exists() and not create:
        raise StoreError(f"{path} does not exist")
    conn = sqlite3.connect(path, timeout=60)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        conn.close()
        raise StoreError(f"{path} is not an SQLite activation store ({err})") from err
    if tables and "tensors" not in tables:
        conn.close()
        raise StoreError(f"{path} is an SQLite file without a 'tensors' table ({sorted(tables)}); not a tl_vlm/VLM-Lens store")
    if "tensors" in tables:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(tensors)")]
        if columns != TENSOR_COLUMNS:
            conn.close()
            raise StoreError(f"{path}: table 'tensors' has columns {columns}, expected VLM-Lens's {TENSOR_COLUMNS}")
    if create:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with conn:
            conn.execute(TENSORS)
            for statement in SIDE_TABLES:
                conn.execute(statement)
    return conn
