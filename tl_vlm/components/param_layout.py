"""TL-layout parameters stored as views of HF-layout (``[out, in]``) storage.

``W_Q[h, d_model, d_head]`` is a strided view of the ``[h * d_head, d_model]`` matrix that
``F.linear`` consumes, so the forward pass reshapes back with no copy and runs HF's kernels.
A parameter a user replaces with a contiguous TL-layout tensor still works (the reshape copies).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def heads_in(w: Float[Tensor, "hd d_model"], d_head: int) -> Float[Tensor, "head d_model d_head"]:
    return w.view(-1, d_head, w.shape[-1]).transpose(1, 2)


def heads_in_linear(W: Float[Tensor, "head d_model d_head"]) -> Float[Tensor, "hd d_model"]:
    return W.transpose(1, 2).reshape(-1, W.shape[1])


def heads_out(w: Float[Tensor, "d_model hd"], d_head: int) -> Float[Tensor, "head d_head d_model"]:
    return w.view(w.shape[0], -1, d_head).permute(1, 2, 0)


def heads_out_linear(W: Float[Tensor, "head d_head d_model"]) -> Float[Tensor, "d_model hd"]:
    return W.permute(2, 0, 1).reshape(W.shape[-1], -1)


def bias_heads(b: Float[Tensor, " hd"], d_head: int) -> Float[Tensor, "head d_head"]:
    return b.view(-1, d_head)


def transposed(w: Tensor) -> Tensor:
    return w.T


def empty_heads_in(n_heads: int, d_model: int, d_head: int) -> Tensor:
    return heads_in(torch.empty(n_heads * d_head, d_model), d_head)


def empty_heads_out(n_heads: int, d_head: int, d_model: int) -> Tensor:
    return heads_out(torch.empty(d_model, n_heads * d_head), d_head)


def empty_in_out(d_in: int, d_out: int) -> Tensor:
    """``[d_in, d_out]`` TL matrix over ``[d_out, d_in]`` storage."""
    return torch.empty(d_out, d_in).T
