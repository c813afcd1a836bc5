"""One writer per store: an exclusive ``flock`` on the DB file, taken up front and refused when held.

Two ``extract`` (or ``merge``) processes on one file would both compute the same work list; the second then
died on a duplicate key and lost its batch. The lock is the kernel's, so a killed writer never leaves it
stale, and it is independent of SQLite's own locks (readers are never blocked by it).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tl_vlm.store.schema import StoreError


@contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the store at ``path`` (created if missing) for writing; StoreError if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{path} is in use by another tl-vlm extract or merge; wait for it to finish, or write to another "
                "output_db and combine the two with tl-vlm merge"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock
