"""Samples to extract: a folder of images with one prompt, or a VLM-Lens dataset (id, prompt, image, label)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from tl_vlm.store.config import ExtractConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Sample:
    key: str  # unique within a run: the dataset id, or the path below input_dir
    prompt: str
    image_path: str | None
    image_id: int | None
    label: str | None
    image: Any = None  # a PIL image already in the dataset, else loaded from image_path

    def load_image(self) -> Image.Image:
        if self.image is not None:
            return self.image.convert("RGB")
        with Image.open(self.image_path) as image:
            return image.convert("RGB")


def samples(config: ExtractConfig) -> Iterator[Sample]:
    if config.input_dir is not None:
        root = Path(config.input_dir).resolve()
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            yield Sample(str(path.relative_to(root)), config.prompt, str(path), None, None)
        return
    spec = config.dataset
    table = _load_table(spec)
    image_root = Path(spec.get("image_dataset_path") or ".").resolve()
    for row in table:
        if "image" not in row and "image_path" in row:  # VLM-Lens's name for a path column
            row = {**row, "image": row["image_path"]}
        if "id" not in row or "image" not in row:
            raise ValueError("dataset rows need 'id' and 'image' (or 'image_path') columns (and 'prompt' unless the config gives one)")
        prompt = row.get("prompt") or config.prompt
        if prompt is None:
            raise ValueError(f"row {row['id']} has no prompt and the config gives none")
        image, path = row["image"], None
        if isinstance(image, str):
            path, image = str((image_root / image).resolve()), None
        label = row.get("label")
        yield Sample(str(row["id"]), prompt, path, int(row["id"]), None if label is None else str(label), image)


def _load_table(spec: dict):
    import datasets

    split = spec.get("dataset_split") or "train"
    local = spec.get("local_dataset_path")
    if local is not None:
        path = Path(local)
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise ValueError(f"local_dataset_path {path}: use a saved dataset folder, .csv, .json(l) or .parquet")
            data = datasets.load_dataset(kind, data_files=str(path))
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    if spec.get("dataset_path") is not None:
        return datasets.load_dataset(spec["dataset_path"], split=split)
    raise ValueError("dataset needs local_dataset_path or dataset_path")
