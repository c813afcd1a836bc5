"""SQLite activation store, VLM-Lens compatible: extraction, reading, merging."""

from tl_vlm.store.config import ExtractConfig
from tl_vlm.store.extract import extract, select_hooks
from tl_vlm.store.merge import merge
from tl_vlm.store.reader import load
from tl_vlm.store.schema import StoreError

__all__ = ["ExtractConfig", "StoreError", "extract", "load", "merge", "select_hooks"]
