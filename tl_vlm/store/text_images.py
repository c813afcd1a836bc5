"""VLM-Lens's dataset form: a text dataset (prompt, label and an image key per row) joined to a folder of images.

A config's ``dataset`` list with ``text_dataset_path`` / ``text_split`` / ``prompt_column`` / ``label_column`` /
``image_column`` / ``image_regex`` / ``image_dataset_path`` / ``image_split``: each row's image is the file in
``image_dataset_path[/image_split]`` named ``image_regex.format(id=<image_column value without commas>)``. Rows
are keyed by their index (a CLEVR image carries many questions) and store the image column's value as
``image_id``, as VLM-Lens does.

Only local data is read: a hub dataset id is refused with how to save it locally first, never downloaded. A row
whose image is missing is an error naming it (VLM-Lens drops such rows without a word).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff")  # VLM-Lens's list (no recursion)
TABLE_KINDS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def local_table(path: str, split: str | None, key: str):
    """A split of a local dataset: a ``save_to_disk`` folder, a folder of data files, or one csv / json(l) /
    parquet file."""
    import datasets

    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(
            f"{key} {path!r} is not a local file or folder; tl_vlm reads local datasets only (no hub downloads). "
            f"Save it where you have network: datasets.load_dataset({path!r}).save_to_disk('DIR'), then give DIR"
        )
    if where.is_dir() and any((where / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        data = datasets.load_from_disk(str(where))
    elif where.is_dir():
        data = datasets.load_dataset(str(where))
    elif where.suffix in TABLE_KINDS:
        data = datasets.load_dataset(TABLE_KINDS[where.suffix], data_files=str(where))
    else:
        raise ValueError(f"{key} {path}: use a saved dataset folder, a folder of data files, .csv, .json(l) or .parquet")
    if isinstance(data, datasets.DatasetDict):
        split = split or ("train" if "train" in data else None)
        if split not in data:
            raise ValueError(f"{key} {path} has splits {sorted(data)}; name one (text_split / dataset_split)")
        return data[split]
    return data


def text_to_images(spec: dict, default_prompt: str | None) -> list[dict]:
    """The samples of a VLM-Lens text-to-image dataset spec, as dicts of Sample fields."""
    needed = [k for k in ("image_dataset_path", "image_column", "prompt_column") if not spec.get(k)]
    if needed:
        raise ValueError(f"dataset with text_dataset_path also needs {needed} (VLM-Lens's keys)")
    unknown = set(spec) - {"text_dataset_path", "text_split", "image_dataset_path", "image_split", "image_column",
                           "prompt_column", "label_column", "image_regex"}
    if unknown:
        raise ValueError(f"dataset keys {sorted(unknown)} are not read with text_dataset_path; remove them")
    table = local_table(spec["text_dataset_path"], spec.get("text_split"), "text_dataset_path")
    folder = Path(spec["image_dataset_path"]).resolve()
    if spec.get("image_split"):
        folder = folder / spec["image_split"]
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} (image_dataset_path / image_split) does not exist")
    by_name = {p.name: str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    for column in (spec["image_column"], spec["prompt_column"], spec.get("label_column")):
        if column is not None and column not in table.column_names:
            raise ValueError(f"column {column!r} is not in the text dataset (columns: {table.column_names})")
    regex = spec.get("image_regex") or "{id}"
    found, missing = [], []
    for index, row in enumerate(table):
        ident = row[spec["image_column"]]
        name = regex.format(id=str(ident).replace(",", ""))
        if name not in by_name:
            missing.append(name)
            continue
        label = row[spec["label_column"]] if spec.get("label_column") else None
        found.append(dict(key=str(index), prompt=row[spec["prompt_column"]] or default_prompt, image_path=by_name[name],
                          image_id=ident, label=None if label is None else str(label)))
    if missing:
        raise ValueError(
            f"{len(missing)} rows name images not in {folder} (first: {missing[:3]}); fix image_regex / image_split "
            "or remove those rows (VLM-Lens drops them silently)"
        )
    for sample in found:
        if sample["prompt"] is None:
            raise ValueError(f"row {sample['key']} has no prompt and the config gives none")
    return found

