"""Samples to extract: a folder of images with one prompt, or a VLM-Lens dataset (id, prompt, image, label).

Each sample has a key unique within the run (the dataset id, as given: ``7`` or ``"img_0"``, or the path below
``input_dir``) and, for images read from files, a fingerprint (size and modification time) that tells a rerun
whether the file changed since it was extracted. Only regular files are opened: a FIFO or device named like an
image would block or never end.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tl_vlm.store.config import ExtractConfig
from tl_vlm.store.text_images import local_table, text_to_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit greyscale (PNG, TIFF)


@dataclass
class Sample:
    key: str  # unique within a run: the dataset id, or the path below input_dir
    prompt: str
    image_path: str | None
    image_id: int | str | None  # the dataset id as given (stored in VLM-Lens's image_id column)
    label: str | None
    image: Any = None  # a PIL image already in the dataset, else loaded from image_path
    fingerprint: str | None = None  # "size:mtime_ns" of image_path; None for in-memory images

    def load_image(self) -> Image.Image:
        if self.image is not None:
            return to_rgb(self.image)
        mode = os.stat(self.image_path).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{self.image_path} is not a regular file; only image files are read")
        with Image.open(self.image_path) as image:
            return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the processor expects. 16-bit greyscale is scaled to 8 bits first: PIL's ``convert("RGB")`` clips
    it (everything above 255 turns white), and HF's processors receive it that way."""
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def fingerprint(path: str) -> str | None:
    try:
        info = os.stat(path)
    except OSError:
        return None  # loading reports the real problem
    return f"{info.st_size}:{info.st_mtime_ns}"


def samples(config: ExtractConfig) -> list[Sample]:
    """Every sample of the run, checked before anything runs: ``input_dir`` must be a folder, ids unique."""
    found = _folder(config) if config.input_dir is not None else _dataset(config)
    repeated = [key for key, n in Counter(s.key for s in found).items() if n > 1]
    if repeated:
        raise ValueError(
            f"dataset ids must be unique (they key resumption); repeated: {repeated[:10]}"
            + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
        )
    return found


def _folder(config: ExtractConfig) -> list[Sample]:
    root = Path(config.input_dir).resolve()
    if not root.exists():
        raise FileNotFoundError(f"input_dir {config.input_dir} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"input_dir {config.input_dir} is not a folder; give the folder holding the images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    return [
        Sample(str(path.relative_to(root)), config.prompt, str(path), None, None, fingerprint=fingerprint(str(path)))
        for path in paths
    ]


def _dataset(config: ExtractConfig) -> list[Sample]:
    spec = config.dataset
    if "text_dataset_path" in spec:
        return [Sample(**row, fingerprint=fingerprint(row["image_path"])) for row in text_to_images(spec, config.prompt)]
    image_root = Path(spec.get("image_dataset_path") or ".").resolve()
    found = []
    for row in _load_table(spec):
        if "image" not in row and "image_path" in row:  # VLM-Lens's name for a path column
            row = {**row, "image": row["image_path"]}
        if "id" not in row or "image" not in row:
            raise ValueError("dataset rows need 'id' and 'image' (or 'image_path') columns (and 'prompt' unless the config gives one)")
        ident = row["id"]
        if isinstance(ident, float) and ident.is_integer():  # a CSV id column with a gap is read as floats
            ident = int(ident)
        if isinstance(ident, bool) or not isinstance(ident, (int, str)):
            raise ValueError(f"dataset ids must be integers or strings, got {ident!r}; fill in or fix the id column")
        prompt = row.get("prompt") or config.prompt
        if prompt is None:
            raise ValueError(f"row {ident} has no prompt and the config gives none")
        image, path, stamp = row["image"], None, None
        if isinstance(image, str):
            path, image = str((image_root / image).resolve()), None
            stamp = fingerprint(path)
        label = row.get("label")
        found.append(
            Sample(str(ident), prompt, path, ident, None if label is None else str(label), image, stamp)
        )
    return found


def _load_table(spec: dict):
    import datasets

    split = spec.get("dataset_split") or "train"
    local = spec.get("local_dataset_path")
    if local is not None:
        path = Path(local)
        if not path.exists():
            raise FileNotFoundError(f"local_dataset_path {path} does not exist")
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise ValueError(f"local_dataset_path {path}: use a saved dataset folder, .csv, .json(l) or .parquet")
            data = datasets.load_dataset(kind, data_files=str(path))
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    if spec.get("dataset_path") is not None:
        return local_table(spec["dataset_path"], split, "dataset_path")
    raise ValueError("dataset needs local_dataset_path or dataset_path (or VLM-Lens's text_dataset_path)")
