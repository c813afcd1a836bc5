"""Memory for an activation that is kept (cached) every run, reused from run to run once nothing refers to it.

With every hook point cached, the explicit attention path's scores and pattern ([batch, head, q, k], the largest
entries of a cache) are fresh memory each run on the CPU: the previous run's cache was freed, glibc handed its
pages back to the kernel, and every run pays for faulting (and zeroing) them in again; HF's forward frees those
tensors at once and never does. ``ReusedStorage`` keeps the storage the kernels write into (``out=``) and hands it
out again only when no tensor, view, storage object or autograd graph refers to it any more (the storage's
reference counts, which every tensor, view and storage object sharing it raise, are those of the pool's handle
alone). A user who
keeps a cache therefore never sees it overwritten: the next run takes the second storage, or fresh memory.

Two storages per slot cover ``_, cache = model.run_with_cache(x)`` in a loop (the previous cache is alive until
the call returns). CPU only (CUDA's caching allocator already reuses memory), and from 128 KiB (below, malloc
reuses its heap). Only without autograd (``out=`` ops
do not record gradients), so a forward that needs gradients allocates as before.
"""

from __future__ import annotations

import math
import sys
import threading

import torch
from torch import Tensor

_KEPT = 2  # storages per slot: the cache the caller still holds, and the one this run fills


def _references(handle: Tensor) -> tuple[int, int]:
    """How many hold the handle's memory: C++ references to the storage (one per tensor or view sharing it, and
    one per storage object) and Python references to its storage object (a user may keep ``x.untyped_storage()``,
    which is the very object this call gets back)."""
    storage = handle.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


def _new_handle(nbytes: int) -> Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage(nbytes))


_ALONE = _references(_new_handle(1))  # the counts when the pool's handle is all that refers to the memory


class ReusedStorage:
    # Smaller blocks come from the heap glibc's malloc keeps (its default mmap threshold): fresh, they cost nothing.
    def __init__(self, min_bytes: int = 128 * 1024):
        self.min_bytes = min_bytes
        # uint8 handles on the kept storages, per thread: two threads running the model at once (e.g. the explorer's
        # requests) must not both find the same storage free and write into it.
        self.slots: dict[tuple[int, str], list[Tensor]] = {}

    def empty(self, slot: str, shape: tuple[int, ...], *sources: Tensor) -> Tensor | None:
        """A contiguous ``shape`` tensor of ``sources[0]``'s dtype on memory no one else refers to, to be computed
        from ``sources``; None where reuse does not apply (small, not the CPU, or autograd records this computation):
        the caller allocates as usual."""
        like = sources[0]
        nbytes = like.itemsize * math.prod(shape)
        if nbytes < self.min_bytes or like.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return None
        kept = self.slots.setdefault((threading.get_ident(), slot), [])
        handle = next((h for h in kept if h.untyped_storage().nbytes() == nbytes and _references(h) == _ALONE), None)
        if handle is None:
            handle = _new_handle(nbytes)
            # A block of this size freed once, untouched (no page is faulted in): glibc raises its mmap threshold to
            # the size of a freed mapping and keeps such blocks in its heap from then on, as it would have learned from
            # this activation's own frees had the pool not kept it; otherwise the process's other temporaries of this
            # size stay fresh mappings.
            torch.UntypedStorage(nbytes)  # allocated and freed at once
            # Kept: the newest in-use storage of this size (the others are in use too, or the pool would have taken
            # them) and this one. A dropped storage lives on as long as the cache that holds it.
            kept[:] = [h for h in kept if h.untyped_storage().nbytes() == nbytes][-(_KEPT - 1):] + [handle]
        return torch.empty(0, dtype=like.dtype).set_(handle.untyped_storage(), 0, shape)

    def release(self) -> None:
        """Let go of the kept memory (a cache that still holds some keeps it)."""
        self.slots.clear()
