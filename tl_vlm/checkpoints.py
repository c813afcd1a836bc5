"""Where a checkpoint's files are: a folder, a model bundled with the package (``tl-vlm/<name>``), or the hub.

Weights are read only from the files HF's own loader reads: those named by ``model.safetensors.index.json``,
else ``model.safetensors``; a stray ``.safetensors`` beside them is never loaded (HF ignores it too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Small trained models shipped inside the package (tl_vlm/zoo), addressed as "tl-vlm/<folder name>".
BUNDLED = Path(__file__).parent / "zoo" / "checkpoints"
BUNDLED_PREFIX = "tl-vlm/"
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_METADATA = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def bundled_checkpoint(name: str | os.PathLike) -> Path | None:
    """The folder of a bundled model, or None when ``name`` does not name one."""
    name = str(name)
    if not name.startswith(BUNDLED_PREFIX):
        return None
    path = BUNDLED / name.removeprefix(BUNDLED_PREFIX)
    return path if (path / "config.json").exists() else None


def resolve_checkpoint(model_name: str | os.PathLike, revision: str | None = None) -> Path:
    path = Path(model_name)
    if path.is_dir():
        return path
    bundled = bundled_checkpoint(model_name)
    if bundled is not None:
        return bundled
    from huggingface_hub import snapshot_download

    # Same loader either way: the config and processor files first, then the weight files the index names;
    # never pickles, never other .safetensors in the repository.
    path = Path(snapshot_download(str(model_name), revision=revision, allow_patterns=_METADATA))
    weights = _indexed_files(path) if (path / INDEX).exists() else [SINGLE]
    return Path(snapshot_download(str(model_name), revision=revision, allow_patterns=[*_METADATA, *weights]))


def safetensors_files(path: Path) -> list[Path]:
    """The weight files HF's loader reads from ``path``."""
    if (path / INDEX).exists():
        files = [path / name for name in _indexed_files(path)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX} names weight files that are not in {path}: {missing}")
        return files
    if (path / SINGLE).exists():
        return [path / SINGLE]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    raise FileNotFoundError(
        f"no {SINGLE} or {INDEX} in {path}"
        + (f" (found {others}: HF's loader ignores such names, so tl_vlm does too)" if others else "")
        + "; tl_vlm does not unpickle .bin checkpoints (convert them with save_pretrained(safe_serialization=True))"
    )


def _indexed_files(path: Path) -> list[str]:
    return sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
