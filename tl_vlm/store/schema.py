"""The SQLite layout: VLM-Lens's ``tensors`` table, exactly, plus tl_vlm's bookkeeping tables.

VLM-Lens readers (``pandas.read_sql("SELECT * FROM tensors", conn)`` then
``torch.load(io.BytesIO(blob))``) work on our files unchanged. The side tables record what is
needed to reproduce a run (``runs``), which dataset rows a run has finished (``samples_done``, written
in the same transaction as their tensors, so a killed run leaves no partial batch and resumes
where it stopped; ``fingerprint`` is the image file's size and modification time, so an image edited
after extraction is extracted again), which ``tensors`` rows belong to which sample (``tensor_samples``,
for merging shards without duplicates) and unreadable inputs (``errors``).

Writers run in WAL mode (readers may read while a run writes); a finished run checkpoints and leaves the
file in rollback-journal mode, a single file that a reader can open from a read-only location.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

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
        run_id TEXT NOT NULL, sample_key TEXT NOT NULL, fingerprint TEXT, PRIMARY KEY (run_id, sample_key))""",
    """CREATE TABLE IF NOT EXISTS tensor_samples (
        tensor_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, sample_key TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS errors (
        run_id TEXT NOT NULL, sample_key TEXT NOT NULL, image_path TEXT, reason TEXT NOT NULL,
        timestamp DATETIME DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (run_id, sample_key))""",
    # Resuming and merging look rows up by sample.
    "CREATE INDEX IF NOT EXISTS tensor_samples_by_sample ON tensor_samples (run_id, sample_key)",
]
SIDE_TABLE_NAMES = {"runs", "samples_done", "tensor_samples", "errors"}
TENSOR_COLUMNS = [
    "id", "name", "architecture", "timestamp", "image_path", "image_id", "prompt", "label", "layer",
    "pooling_method", "tensor_dim", "tensor",
]


class StoreError(ValueError):
    """The file is not an activation store we can use, or another process is writing it."""


def read_only_uri(path: str | Path) -> str:
    """An SQLite URI opening ``path`` read-only (works in read-only folders and on read-only files)."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro"


def _writable_uri(path: Path) -> str:
    return f"file:{quote(str(path.resolve()))}?mode=rwc"


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """Open a store to write (``create``: making it if needed) or, with ``create=False``, read-only. A file that
    is not SQLite, or SQLite without VLM-Lens's ``tensors`` table, is refused with the reason."""
    path = Path(path)
    if not path.exists() and not create:
        raise StoreError(f"{path} does not exist")
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the path of an SQLite file")
    try:
        # URIs on both, so a writer can ATTACH a source read-only (merge).
        conn = sqlite3.connect(_writable_uri(path) if create else read_only_uri(path), uri=True, timeout=60)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise StoreError(_reason(path, err, create)) from err
    try:
        _check_tensors(conn, path, tables)
        if create:
            _create(conn, tables)
    except BaseException:
        conn.close()
        raise
    return conn


def _reason(path: Path, err: sqlite3.DatabaseError, create: bool) -> str:
    """Say what is really wrong: only "file is not a database" means it is not SQLite."""
    if "not a database" in str(err) or "malformed" in str(err):
        return f"{path} is not an SQLite activation store ({err})"
    if not create:
        return (
            f"cannot open {path} read-only ({err}); a store left in WAL mode by a killed run needs its "
            f"{path.name}-wal / -shm files and a writable folder: rerun or merge it once where it is writable"
        )
    return f"cannot open {path} for writing ({err})"


def _check_tensors(conn: sqlite3.Connection, path: Path, tables: set[str]) -> None:
    if tables and "tensors" not in tables:
        raise StoreError(f"{path} is an SQLite file without a 'tensors' table ({sorted(tables)}); not a tl_vlm/VLM-Lens store")
    if "tensors" in tables:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(tensors)")]
        if columns != TENSOR_COLUMNS:
            raise StoreError(f"{path}: table 'tensors' has columns {columns}, expected VLM-Lens's {TENSOR_COLUMNS}")


def _create(conn: sqlite3.Connection, tables: set[str]) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    with conn:
        conn.execute(TENSORS)
        for statement in SIDE_TABLES:
            conn.execute(statement)
        if "samples_done" in tables:  # stores written before fingerprints were recorded
            columns = {r[1] for r in conn.execute("PRAGMA table_info(samples_done)")}
            if "fingerprint" not in columns:
                conn.execute("ALTER TABLE samples_done ADD COLUMN fingerprint TEXT")


def finish(conn: sqlite3.Connection) -> None:
    """Fold the WAL into the file and leave WAL mode, so a read-only reader can open the store; if a reader holds
    it open right now, the store stays in WAL mode (still correct, readable where writable)."""
    try:
        conn.execute("PRAGMA busy_timeout = 2000")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.OperationalError:
        pass


def drop_sample(conn: sqlite3.Connection, run_id: str, key: str) -> None:
    """Remove one finished sample's rows (its image changed: it is about to be extracted again)."""
    conn.execute(
        "DELETE FROM tensors WHERE id IN (SELECT tensor_id FROM tensor_samples WHERE run_id = ? AND sample_key = ?)",
        (run_id, key),
    )
    conn.execute("DELETE FROM tensor_samples WHERE run_id = ? AND sample_key = ?", (run_id, key))
    conn.execute("DELETE FROM samples_done WHERE run_id = ? AND sample_key = ?", (run_id, key))


def done_samples(conn: sqlite3.Connection, run_id: str, schema: str = "main") -> dict[str, str | None]:
    """Sample key -> fingerprint of the samples ``run_id`` finished (None for stores written before fingerprints)."""
    columns = {r[1] for r in conn.execute(f"PRAGMA {schema}.table_info(samples_done)")}
    stamp = "fingerprint" if "fingerprint" in columns else "NULL"
    query = f"SELECT sample_key, {stamp} FROM {schema}.samples_done WHERE run_id = ?"
    return dict(conn.execute(query, (run_id,)).fetchall())


def has_side_tables(conn: sqlite3.Connection, schema: str = "main") -> bool:
    tables = {r[0] for r in conn.execute(f"SELECT name FROM {schema}.sqlite_master WHERE type = 'table'")}
    return SIDE_TABLE_NAMES <= tables
