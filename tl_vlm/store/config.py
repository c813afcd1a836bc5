"""Extraction config: VLM-Lens's YAML keys, plus tl_vlm's (batch size, float16 storage, dtype, device).

Validated by pydantic against the field types below (strictly for flags and numbers: YAML's ``"false"`` is a
string, not False), and bounded: a config file over ``MAX_BYTES`` or one whose YAML aliases expand to more than
``MAX_NODES`` values (an "alias bomb", which hashing the run id would expand) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, StrictBool, StrictInt, ValidationError
from pydantic.dataclasses import dataclass

from tl_vlm.store.pooling import POOLING

MAX_BYTES = 1 << 20
MAX_NODES = 100_000

# Paths may be given as str or os.PathLike from Python; YAML gives strings.
PathStr = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


@dataclass(config=ConfigDict(extra="forbid"))
class ExtractConfig:
    model_path: PathStr
    modules: list[str] | str  # hook names, or HF module names as VLM-Lens writes them (tl_vlm.hf_names)
    output_db: PathStr = "embeddings.db"  # VLM-Lens's default
    architecture: str | None = None
    model: list[dict[str, Any]] | dict[str, Any] = field(default_factory=list)  # VLM-Lens: from_pretrained kwargs
    forward: list[dict[str, Any]] | dict[str, Any] = field(default_factory=dict)  # VLM-Lens: a list of one-key dicts
    prompt: str | None = None
    input_dir: PathStr | None = None
    # VLM-Lens writes it, like model, as a list of one-key dicts
    dataset: list[dict[str, Any]] | dict[str, Any] | None = None
    pooling_method: str | None = "none"
    pooled_output: StrictBool | None = None  # VLM-Lens: true = mean over the sequence (pooling_method mean)
    batch_size: StrictInt = 8
    float16: StrictBool = False
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    revision: str | None = None

    def __post_init__(self) -> None:
        _check_size({f.name: getattr(self, f.name) for f in fields(self)})
        if self.pooling_method in (None, "None"):
            self.pooling_method = "none"
        if self.pooled_output and self.pooling_method not in ("none", "mean"):
            raise ValueError(f"pooled_output: true is mean pooling; it contradicts pooling_method {self.pooling_method!r}")
        if self.pooled_output:
            self.pooling_method = "mean"
        if self.pooling_method not in POOLING:
            raise ValueError(f"pooling_method {self.pooling_method!r} is not one of {POOLING}")
        if isinstance(self.forward, list):
            self.forward = {k: v for item in self.forward for k, v in item.items()}
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
        raw = cls.raw_yaml(path)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        _check_size(raw)
        try:
            return cls(**raw)
        except ValidationError as err:
            raise ValueError(f"config {path}: " + "; ".join(_describe(e) for e in err.errors())) from None

    @staticmethod
    def raw_yaml(path: str | Path) -> dict:
        """The config file's mapping, read within the size bounds."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist or is not a regular file")
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"config {path} is {path.stat().st_size} bytes; a config is at most {MAX_BYTES}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML (plain keys and values only): {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {path} must be a mapping of keys to values, got a {type(raw).__name__}")
        _check_size(raw)
        return raw

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
        for volatile in ("output_db", "batch_size", "device", "pooled_output"):  # pooled_output: in pooling_method
            keys.pop(volatile)
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "config"
    return f"{where}: {error['msg']} (got {error['input']!r:.80})"


def _check_size(value: Any) -> None:
    """Count values as YAML aliases would expand them, stopping at MAX_NODES (never expanding a bomb)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ValueError(
                f"the config holds more than {MAX_NODES} values once YAML aliases are expanded; "
                "write the values out (an alias bomb?)"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
