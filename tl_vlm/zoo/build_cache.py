"""Idempotent, seeded builds of fixture checkpoints: one marker file, written last."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

import torch

MARKER_FILE = "tl_vlm_tiny.json"


def cached_build(
    path: str | os.PathLike, variant: str, seed: int, format_version: int, build: Callable[[pathlib.Path], None]
) -> pathlib.Path:
    """Run ``build(path)`` under ``torch.manual_seed(seed)`` unless ``path`` already holds a complete build of the
    same variant, seed and format. The caller's torch RNG state is left untouched."""
    path = pathlib.Path(path)
    marker = path / MARKER_FILE
    expected = {"variant": variant, "seed": seed, "format": format_version}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return path
    path.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a crash mid-build must not leave an old marker behind
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build(path)
    marker.write_text(json.dumps(expected))
    return path


def cached_pretrained_build(
    path: str | os.PathLike, variant: str, seed: int, format_version: int, make: Callable[[], tuple[Any, Any]]
) -> pathlib.Path:
    """``cached_build`` of the (model, processor) pair that ``make`` builds, both written with ``save_pretrained``."""

    def build(target: pathlib.Path) -> None:
        model, processor = make()
        model.save_pretrained(target)
        processor.save_pretrained(target)

    return cached_build(path, variant, seed, format_version, build)
