"""Blocks kept in CPU memory and streamed to one execution device, one block at a time.

For one-GPU users of checkpoints larger than the GPU: each language block's weights stay in (pinned) CPU memory;
just before a block runs its weights are copied to the execution device (the next block's copy is started on a
side CUDA stream, so it overlaps this block's compute) and released after it. Hooks, caches and patching see the
same activations as an unsplit model; weight gradients are not supported on offloaded blocks (inference and
activation gradients only).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class BlockOffload:
    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # Host copies: pinned where a CUDA copy can then run asynchronously.
        self.host = [
            {name: (t.data.pin_memory() if cuda else t.data) for name, t in _tensors(block)} for block in blocks
        ]
        self.staged: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            self._release(i)
            self.handles.append(block.register_forward_pre_hook(lambda module, args, i=i: self._load(i)))
            self.handles.append(block.register_forward_hook(lambda module, args, out, i=i: self._release(i)))

    def _stage(self, i: int) -> None:
        if i in self.staged or i >= len(self.blocks):
            return
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            self.staged[i] = {name: t.to(self.device, non_blocking=True) for name, t in self.host[i].items()}

    def _load(self, i: int) -> None:
        self._stage(i)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for name, t in _tensors(self.blocks[i]):
            t.data = self.staged[i][name]
        del self.staged[i]
        self._stage(i + 1)  # prefetch: overlaps this block's compute

    def _release(self, i: int) -> None:
        for name, t in _tensors(self.blocks[i]):
            t.data = self.host[i][name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]
