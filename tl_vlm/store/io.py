"""Tensor blobs in VLM-Lens's encoding (``torch.save`` zip bytes), read back without unpickling code."""

from __future__ import annotations

import io
import pickle

import torch
from torch import Tensor


def to_blob(tensor: Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return buffer.getvalue()


def from_blob(blob: bytes) -> Tensor:
    """A DB is untrusted input: ``weights_only`` loading refuses anything but tensors and plain data."""
    try:
        tensor = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"refused a stored blob that is not a plain tensor ({str(err).splitlines()[0]})") from err
    if not isinstance(tensor, Tensor):
        raise ValueError(f"refused a stored blob holding {type(tensor).__name__}, not a tensor")
    return tensor
