"""The trained toy checkpoints shipped inside the package, addressable by hub-style names offline.

``HookedVLM.from_pretrained("tl-vlm/toy-llava")`` (or ``toy-blip2``, ``toy-qwen2-vl``) finds them among the
package's bundled checkpoints (tl_vlm/checkpoints.py) before any hub lookup; ``toy_checkpoint`` gives the
folder for HF's own ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tl_vlm.checkpoints import BUNDLED, BUNDLED_PREFIX

__all__ = ["TOYS", "toy_checkpoint", "toy_metrics"]

# hub-style name -> training family in zoo/train.py
TOYS = {"tl-vlm/toy-llava": "llava", "tl-vlm/toy-blip2": "blip2", "tl-vlm/toy-qwen2-vl": "qwen2_vl",
        "tl-vlm/toy-llava-bias": "llava_bias"}


def toy_checkpoint(name: str | os.PathLike) -> Path | None:
    """The folder of a shipped toy, or None when `name` is not a toy name."""
    if str(name) not in TOYS:
        return None
    path = BUNDLED / str(name).removeprefix(BUNDLED_PREFIX)
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
