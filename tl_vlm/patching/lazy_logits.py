"""The logits a patching metric gets from the first-position shortcut, unembedded only where it reads them.

TL's contract gives the metric all ``[batch, pos, d_vocab]`` logits, but a metric usually reads one position
(``logits[:, -1, token]``), and unembedding every position after the patched one costs more than the blocks at
a real vocabulary. ``LazyLogits`` is a tensor of that shape holding the last block's residual stream instead:
indexing whose position entry is an int, a slice or integer positions fills just those rows of a buffer and
indexes the buffer as asked (views stay views, so a metric's writes stay written); any other use (``log_softmax``,
``argmax``, arithmetic, ``.numpy()``...) fills every row first. Every metric gets TL's values (up to the rounding
of matmuls of other shapes, as the shortcut itself).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils._pytree import tree_map

# What reads only a tensor's metadata: answered without unembedding anything.
_METADATA = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__, Tensor.layout.__get__,
    Tensor.requires_grad.__get__, Tensor.is_cuda.__get__, Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__,
    Tensor.is_floating_point, Tensor.element_size,
}


class LazyLogits(Tensor):
    """Logits ``[batch, pos, d_vocab]`` of one patched copy: the corrupted run's at positions before ``first``,
    ``unembed(resid)`` from ``first`` on, NaN before the last ``keep`` positions when ``keep`` (logits_to_keep).

    Positions land in one buffer as they are read, so what a metric indexes is a view of it and what it writes
    (in place, or through such a view) stays written, as in the plain tensor TL hands it."""

    prefix: Float[Tensor, "batch pos d_vocab"]
    resid: Float[Tensor, "batch suffix d_model"]

    @staticmethod
    def __new__(cls, prefix: Tensor, resid: Tensor, first: int, keep: int, unembed: Callable[[Tensor], Tensor]):
        self = Tensor._make_wrapper_subclass(cls, prefix.shape, dtype=prefix.dtype, device=prefix.device)
        self.prefix, self.resid, self.first, self.unembed = prefix, resid, first, unembed
        self.nan_before = prefix.shape[1] - keep if keep else 0
        self.buffer: Tensor | None = None  # allocated on the first read; only filled rows are touched
        self.filled: set[int] = set()
        return self

    def materialize(self) -> Float[Tensor, "batch pos d_vocab"]:
        return self.fill(range(self.shape[1]))

    def fill(self, positions) -> Float[Tensor, "batch pos d_vocab"]:
        """The buffer, with ``positions`` (and all filled before) holding their logits."""
        if self.buffer is None:
            self.buffer = self.prefix.new_empty(self.shape)
        missing = sorted(set(positions) - self.filled)
        computed = [p for p in missing if p >= max(self.first, self.nan_before)]
        copied = [p for p in missing if self.nan_before <= p < self.first]
        if computed:
            picked = torch.tensor([p - self.first for p in computed], device=self.resid.device)
            self.buffer[:, computed] = self.unembed(self.resid[:, picked])
        if copied:
            self.buffer[:, copied] = self.prefix[:, copied]
        self.buffer[:, [p for p in missing if p < self.nan_before]] = float("nan")
        self.filled.update(missing)
        return self.buffer

    def __repr__(self) -> str:
        return f"LazyLogits({self.materialize()!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is Tensor.__getitem__ and isinstance(args[0], LazyLogits):
            positions = _read_positions(args[1], args[0].shape[1])
            if positions is not None:
                return args[0].fill(positions)[args[1]]
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by paths that bypass __torch_function__ (e.g. torch internals): compute everything.
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs or {}))
        return func(*args, **kwargs)


def _read_positions(index, n_pos: int) -> list[int] | None:
    """The positions an index reads, when its first entry is one batch axis and its second one the position axis
    (an int, a slice, or a 1-D integer tensor or list); None for anything else (then every position is filled:
    a wrong answer here would read rows never filled)."""
    if not isinstance(index, tuple):
        return None  # the batch axis alone: every position is read
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        fill = 3 - (len(index) - 1)
        if fill < 0 or not all(_one_axis(i) for k, i in enumerate(index) if k != at):
            return None  # how many axes the Ellipsis stands for depends on entries that are not one axis each
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    if len(index) < 2 or not _one_axis(index[0]):
        return None
    pos = index[1]
    if isinstance(pos, slice):
        return list(range(n_pos)[pos])
    if not _one_axis(pos):
        return None
    if isinstance(pos, (Tensor, list)):
        values = torch.as_tensor(pos).reshape(-1).tolist()
        return [p % n_pos for p in values] if all(-n_pos <= p < n_pos for p in values) else None
    pos = operator.index(pos)
    return [pos % n_pos] if -n_pos <= pos < n_pos else None  # out of range: the full path raises the IndexError


def _one_axis(entry) -> bool:
    """Whether an index entry consumes exactly one axis: an int, a slice, a 0-d or 1-D integer tensor, a list of
    ints (not None, Ellipsis, bools, masks, floats, nested lists)."""
    if isinstance(entry, slice):
        return True
    if isinstance(entry, bool):
        return False
    if isinstance(entry, Tensor):
        return entry.ndim <= 1 and entry.dtype not in (torch.bool, torch.uint8) and not entry.is_floating_point() and not entry.is_complex()
    if isinstance(entry, list):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
    try:
        operator.index(entry)
    except TypeError:
        return False
    return True
