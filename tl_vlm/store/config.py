"""Extraction config: VLM-Lens's YAML keys, plus tl_vlm's (batch size, float16 storage, dtype, device)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tl_vlm.store.pooling import POOLING


@dataclass
class ExtractConfig:
    model_path: str
    output_db: str
    modules: list[str]
    architecture: str | None = None
    model: list[dict] | dict = field(default_factory=list)  # VLM-Lens: from_pretrained kwargs
    forward: dict = field(default_factory=dict)
    prompt: str | None = None
    input_dir: str | None = None
    dataset: list[dict] | dict | None = None  # VLM-Lens writes it, like model, as a list of one-key dicts
    pooling_method: str = "none"
    batch_size: int = 8
    float16: bool = False
    device: str | None = None
    dtype: str = "float32"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.pooling_method in (None, "None"):
            self.pooling_method = "none"
        if self.pooling_method not in POOLING:
            raise ValueError(f"pooling_method {self.pooling_method!r} is not one of {POOLING}")
        if isinstance(self.dataset, list):
            self.dataset = {k: v for item in self.dataset for k, v in item.items()}
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if not self.modules:
            raise ValueError("modules: give at least one regular expression or glob over hook names")
        if (self.input_dir is None) == (self.dataset is None):
            raise ValueError("give exactly one of input_dir (with prompt) or dataset")
        if self.input_dir is not None and self.prompt is None:
            raise ValueError("input_dir needs a prompt")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.forward:
            raise ValueError(
                f"forward kwargs {sorted(self.forward)} are not supported: extraction runs one forward pass "
                "over prompt + image; remove them"
            )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ExtractConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)

    def model_kwargs(self) -> dict:
        """VLM-Lens lists from_pretrained kwargs as a list of one-key dicts; accept both forms."""
        if isinstance(self.model, dict):
            return dict(self.model)
        merged: dict = {}
        for item in self.model:
            merged.update(item)
        return merged

    def run_id(self) -> str:
        """Everything that changes the stored numbers; batch size and paths to the DB do not."""
        keys = asdict(self)
        for volatile in ("output_db", "batch_size", "device"):
            keys.pop(volatile)
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
