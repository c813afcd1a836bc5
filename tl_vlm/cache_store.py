"""Where ``run_with_cache`` puts activations when asked for a position slice, another device or an arena.

TL's ``run_with_cache(device=, pos_slice=)`` registers a caching hook per point; here the hook points store
into a ``SlicedCache`` directly (components/hooks.py: ``cache_into``), which applies TL's ``save_hook``
semantics to each activation as it is stored: detach, drop the batch dimension (``remove_batch_dim``), slice
positions (``pos_slice`` along TL's position axis: -3 for ``hook_q|k|v|z|result``, else -2, only where the
tensor has that many dimensions), move to ``device``. It slices before it copies, so only the kept positions
travel and a slice does not keep the whole activation alive. From a GPU to the CPU it copies into pinned
memory without blocking, and ``finish`` waits once for all copies at the end of the run. A ``CacheArena``
(opt-in) keeps the stored tensors' memory from run to run.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformer_lens.utilities import Slice
from transformer_lens.utilities import remove_batch_dim as drop_batch_dim

_HEAD_VECTORS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")


class CacheArena:
    """Opt-in storage that ``run_with_cache(..., arena=arena)`` reuses from run to run: each activation is copied
    into the arena's buffer for its name (allocated on the first run of a shape, kept after), instead of keeping
    the freshly allocated activation. Repeated runs of one shape then touch the same memory every time, rather
    than fresh pages the allocator must fault in (on CPU, the main cost of caching everything).

    The returned cache holds the arena's buffers: THE NEXT RUN WITH THIS ARENA OVERWRITES THEM. Clone what you
    keep (``cache[name].clone()``), or use one arena per cache you keep."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def holding(self, name: str, x: Tensor) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype or buffer.device != x.device:
            buffer = self.buffers[name] = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return buffer.copy_(x)


class SlicedCache(dict):
    def __init__(self, device=None, pos_slice=None, remove_batch_dim: bool = False, arena: CacheArena | None = None):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.pos_slice = Slice.unwrap(pos_slice)
        self.remove_batch_dim = remove_batch_dim
        self.arena = arena
        self.pending: set[torch.device] = set()  # CUDA devices with non-blocking copies in flight

    def __setitem__(self, name: str, x: Tensor) -> None:
        x = x.detach()
        if self.remove_batch_dim:
            x = drop_batch_dim(x)
        pos_dim = -3 if name.endswith(_HEAD_VECTORS) else -2
        if x.dim() >= -pos_dim and self.pos_slice.mode != "identity":
            x = self.pos_slice.apply(x, dim=pos_dim)
            if x.numel() * x.element_size() < x.untyped_storage().nbytes():
                x = x.clone()  # keep the slice, not the whole activation
        x = self._moved(x)
        super().__setitem__(name, x if self.arena is None else self.arena.holding(name, x))

    def _moved(self, x: Tensor) -> Tensor:
        device = self.device
        if device is None or x.device == device:
            return x
        if x.is_cuda and device.type == "cpu":
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            out.copy_(x, non_blocking=True)
            self.pending.add(x.device)
            return out
        return x.to(device)

    def finish(self) -> dict[str, Tensor]:
        """The stored activations once every copy has landed."""
        for device in self.pending:
            torch.cuda.synchronize(device)
        self.pending.clear()
        return dict(self)
