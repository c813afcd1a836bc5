"""The logits a patching metric gets from the first-position shortcut, unembedded only where it reads them.

TL's contract gives the metric all ``[batch, pos, d_vocab]`` logits, but a metric usually reads one position
(``logits[:, -1, token]``), and unembedding every position after the patched one costs more than the blocks at
a real vocabulary. ``LazyLogits`` is a tensor of that shape holding the last block's residual stream instead:
indexing that names positions (an int or a forward slice on the position axis) unembeds those positions only;
any other use (``log_softmax``, ``argmax``, arithmetic, ``.numpy()``...) unembeds every position first, so every
metric gets TL's values (up to the rounding of matmuls of other shapes, as the shortcut itself).
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
    ``unembed(resid)`` from ``first`` on, NaN before the last ``keep`` positions when ``keep`` (logits_to_keep)."""

    prefix: Float[Tensor, "batch pos d_vocab"]
    resid: Float[Tensor, "batch suffix d_model"]

    @staticmethod
    def __new__(cls, prefix: Tensor, resid: Tensor, first: int, keep: int, unembed: Callable[[Tensor], Tensor]):
        self = Tensor._make_wrapper_subclass(cls, prefix.shape, dtype=prefix.dtype, device=prefix.device)
        self.prefix, self.resid, self.first, self.unembed = prefix, resid, first, unembed
        self.nan_before = prefix.shape[1] - keep if keep else 0
        self.full: Tensor | None = None
        return self

    def materialize(self) -> Float[Tensor, "batch pos d_vocab"]:
        if self.full is None:
            self.full = self.rows(list(range(self.shape[1])))
        return self.full

    def rows(self, positions: list[int]) -> Float[Tensor, "batch n d_vocab"]:
        """The logits at ``positions`` (ascending), each computed or copied once."""
        out = self.prefix.new_empty(self.shape[0], len(positions), self.shape[2])
        computed = [i for i, p in enumerate(positions) if p >= max(self.first, self.nan_before)]
        copied = [i for i, p in enumerate(positions) if self.nan_before <= p < self.first]
        if computed:
            picked = torch.tensor([positions[i] - self.first for i in computed], device=self.resid.device)
            out[:, computed] = self.unembed(self.resid[:, picked])
        if copied:
            out[:, copied] = self.prefix[:, [positions[i] for i in copied]]
        out[:, [i for i, p in enumerate(positions) if p < self.nan_before]] = float("nan")
        return out

    def __repr__(self) -> str:
        return f"LazyLogits({self.materialize()!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is Tensor.__getitem__ and isinstance(args[0], LazyLogits):
            narrowed = _narrow(args[1], args[0].shape[1])
            if narrowed is not None:
                positions, index = narrowed
                return args[0].rows(positions)[index]
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by paths that bypass __torch_function__ (e.g. torch internals): compute everything.
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs or {}))
        return func(*args, **kwargs)


def _narrow(index, n_pos: int) -> tuple[list[int], tuple] | None:
    """The positions an index reads and the same index over just those rows, when it names them with an int or a
    forward slice on axis 1; None for anything else (then every position is computed)."""
    if not isinstance(index, tuple):
        return None  # the batch axis alone: every position is read
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        fill = 3 - (len(index) - 1)
        if fill < 0:
            return None
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    if len(index) < 2 or any(i is None or isinstance(i, bool) for i in index):
        return None
    pos = index[1]
    if isinstance(pos, slice):
        if pos.step is not None and pos.step <= 0:
            return None
        positions = list(range(n_pos)[pos])
        return (positions, index[:1] + (slice(None),) + index[2:]) if positions else None
    if isinstance(pos, Tensor):
        if pos.ndim or pos.dtype == torch.bool or pos.is_floating_point():
            return None
        pos = int(pos)
    try:
        pos = operator.index(pos)
    except TypeError:
        return None
    if not -n_pos <= pos < n_pos:
        return None  # the full path raises the IndexError
    return [pos % n_pos], index[:1] + (0,) + index[2:]
