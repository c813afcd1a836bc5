"""The trained toy checkpoints shipped inside the package, addressable by hub-style names offline.

``HookedVLM.from_pretrained("tl-vlm/toy-llava")`` (or ``toy-blip2``, ``toy-qwen2-vl``) resolves here
before any hub lookup; ``toy_checkpoint`` gives the folder for HF's own ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["TOYS", "toy_checkpoint", "toy_metrics"]

CHECKPOINTS = Path(__file__).parent / "checkpoints"
# hub-style name -> training family in zoo/train.py
TOYS = {"tl-vlm/toy-llava": "llava", "tl-vlm/toy-blip2": "blip2", "tl-vlm/toy-qwen2-vl": "qwen2_vl"}


def toy_checkpoint(name: str | os.PathLike) -> Path | None:
    """The folder of a shipped toy, or None when `name` is not a toy name."""
    if str(name) not in TOYS:
        return None
    path = CHECKPOINTS / str(name).split("/", 1)[1]
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"toy checkpoint {name!r} is missing from {path}; the package install is incomplete "
            f"(rebuild it with `python -m tl_vlm.zoo.train {TOYS[str(name)]} {path}`)"
        )
    return path


def toy_metrics(name: str) -> dict:
    """Training record of a toy: held-out accuracy per question type, steps, minutes."""
    path = toy_checkpoint(name)
    if path is None:
        raise ValueError(f"{name!r} is not a toy model; choose from {sorted(TOYS)}")
    return json.loads((path / "toy_metrics.json").read_text())
