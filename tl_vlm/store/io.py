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
    if not isinstance(blob, bytes):
        raise ValueError(f"refused a stored value of type {type(blob).__name__}; tensors are stored as BLOBs")
    if not blob:
        raise ValueError("refused an empty stored blob")
    try:
        tensor = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, IndexError, KeyError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"refused a stored blob that is not a plain tensor ({reason})") from err
    if not isinstance(tensor, Tensor):
        raise ValueError(f"refused a stored blob holding {type(tensor).__name__}, not a tensor")
    # A view may claim more elements than its storage holds (stride 0): materialising it could take any
    # amount of memory, and no tensor tl_vlm or VLM-Lens saves looks like that.
    held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.numel() > held:
        raise ValueError(
            f"refused a stored blob whose tensor claims {tensor.numel()} elements over a storage of {held} "
            f"(shape {tuple(tensor.shape)}, stride {tensor.stride()})"
        )
    return tensor
