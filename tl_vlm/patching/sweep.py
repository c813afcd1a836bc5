"""Activation patching with many cells per forward: TL's ``generic_activation_patch``, batched.

TL's loop runs one forward per cell (layer, position, head ...). Here the corrupted input is repeated
``n`` times along the batch and cell ``j`` patches only its own copy (rows ``j*B:(j+1)*B`` of the activation,
``B`` the corrupted batch), so one forward evaluates ``n`` cells. Rows of a batch never mix in a transformer,
so each cell sees exactly the run TL would make, and the metric gets exactly TL's ``[B, pos, d_vocab]`` logits
of its copy. Works on anything TL's loop works on: a HookedVLM, a tower view (``model.tower("vision")``,
whose rows are images), a HookedTransformer.

On the language tower of a decoder-only VLM, cells patching one position (resid, attn/mlp out, per-head q/k/v/z)
also skip what they cannot change (prefix.py): the positions before the first patched one, whose keys, values
and logits are the corrupted run's, and the layers below the first patched one.

Cells per forward: ``batch_size`` (default: what an estimate of a cell's memory says fits); a forward that runs
out of memory is split in halves and retried, and a single cell that does not fit is an error naming
``batch_size``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import get_act_name

from tl_vlm.inputs import VLMInputs
from tl_vlm.patching.prefix import PrefixRun
from tl_vlm.tower_view import TowerInputs

Setter = Callable[[Tensor, Sequence[int], Tensor], Tensor]
Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Any]
CPU_BUDGET_BYTES = 1 << 28  # per forward on CPU: batching saves no FLOPs there, and small chunks share a first position


class CellDoesNotFit(MemoryError):
    """One patching cell (one forward of the corrupted batch) does not fit in memory."""


def generic_activation_patch(
    model,
    corrupted_tokens,
    clean_cache: ActivationCache,
    patching_metric: Metric,
    patch_setter: Setter,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: pd.DataFrame | None = None,
    return_index_df: bool = False,
    *,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    logits_to_keep: int = 0,
) -> Tensor | tuple[Tensor, pd.DataFrame]:
    """TL's ``generic_activation_patch`` (same arguments, same tensor), evaluating ``batch_size`` cells per
    forward. ``patching_metric`` must return a scalar (TL's default ``reduce="scalar"``). ``reuse_prefix``: use
    the first-position shortcut where it applies (prefix.py); False runs every cell in full. Under the shortcut
    the metric gets a ``LazyLogits`` tensor (lazy_logits.py): indexing positions with an int or a slice unembeds
    only those, any other use all of them, so every metric sees TL's values and ``logits[:, -1, token]`` costs
    one position's unembedding, not the whole suffix's.

    ``logits_to_keep`` (opt-in, HookedVLM and its tower views): unembed only the last ``logits_to_keep``
    positions (HF's argument of that name), for a metric that reads only those, also on paths without the
    shortcut (vision tower views, BLIP-2's legacy queries, models with PyTorch hooks). The metric still gets
    ``[batch, pos, d_vocab]`` logits, NaN at the other positions; a metric that returns NaN (it read one) is an
    error, checked on the corrupted run before the sweep and on every cell. On that path the logits a metric
    gets are views of a buffer the next chunk reuses: the metric reads them, it does not keep them."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of cells per forward, got {batch_size}")
    keep = _check_keep(model, corrupted_tokens, patching_metric, logits_to_keep)
    index_df, shape = _index(model, corrupted_tokens, activation_name, index_axis_names, index_df)
    cells = [tuple(int(v) for v in row) for row in index_df.itertuples(index=False)]
    out = torch.zeros(len(cells) if shape is None else shape, device=model.cfg.device)
    prefix = PrefixRun.build(model, corrupted_tokens, patch_setter, activation_name) if reuse_prefix else None
    per_forward = batch_size or _default_batch_size(model, corrupted_tokens, len(cells))
    # The shortcut's cost follows a chunk's first layer and position: chunks of neighbouring cells share them.
    order = list(range(len(cells)))
    if prefix is not None:
        order.sort(key=lambda i: cells[i][:2] if prefix.per_position else cells[i][:1])
    start = 0
    with torch.no_grad():
        while start < len(cells):
            picked = order[start : start + per_forward]
            if prefix is not None:  # a chunk stays in one layer: crossing into the next would restart at position 0
                picked = [i for i in picked if cells[i][0] == cells[picked[0]][0]]
            chunk = [cells[i] for i in picked]
            try:
                values = _evaluate(model, corrupted_tokens, clean_cache, patching_metric, patch_setter,
                                   activation_name, chunk, prefix, keep)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _out_of_memory(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    raise CellDoesNotFit(
                        f"one patching cell (a forward of the corrupted batch of {len(corrupted_tokens)}) does not fit "
                        f"in memory even with batch_size=1 ({err}); patch fewer corrupted prompts at once or use a "
                        "device with more memory"
                    ) from None
                per_forward = len(chunk) // 2
                warnings.warn(f"{len(chunk)} patching cells per forward ran out of memory; retrying with "
                              f"batch_size={per_forward} (pass batch_size= to start there)")
                continue
            for i, cell, value in zip(picked, chunk, values):
                out[i if shape is None else cell] = value
            start += len(chunk)
    return (out, index_df) if return_index_df else out


def _evaluate(model, tokens, clean_cache, metric, setter, activation_name, cells, prefix, keep) -> list[float]:
    """The metric of each cell, from one forward of ``len(cells)`` copies of the corrupted batch."""
    n = len(cells)
    first = min(cell[1] for cell in cells) if prefix is not None and prefix.per_position else 0
    start_layer = min(cell[0] for cell in cells)
    by_name: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for j, cell in enumerate(cells):
        by_name.setdefault(get_act_name(activation_name, layer=cell[0]), []).append((j, cell))

    def patcher(name: str):
        clean = clean_cache[name]
        if first:
            clean = clean[:, first:]  # the shortcut's activations start at position ``first``

        def hook(act: Tensor, hook) -> Tensor:
            # A copy, as TL's hook patches one when gradients are on (its default): a tower that kept a reference
            # to this tensor (Qwen3-VL's DeepStack reads vision blocks' outputs) must see the unpatched values.
            act = act.clone()
            rows = act.shape[0] // n
            for j, cell in by_name[name]:
                index = [cell[0], cell[1] - first, *cell[2:]] if first else list(cell)
                view = act[j * rows : (j + 1) * rows]
                patched = setter(view, index, clean)
                if patched is not view:  # a setter that builds a new tensor instead of writing in place
                    act[j * rows : (j + 1) * rows] = patched
            return act

        return hook

    hooks = [(name, patcher(name)) for name in by_name]
    if prefix is not None:
        per_cell = prefix.run(hooks, start_layer, first, n, keep.keep if keep else 0)
    else:
        if keep:
            logits = keep.padded(model.run_with_hooks(_repeat(tokens, n), fwd_hooks=hooks, logits_to_keep=keep.keep))
        else:
            logits = model.run_with_hooks(_repeat(tokens, n), fwd_hooks=hooks)
        rows = logits.shape[0] // n
        per_cell = [logits[j * rows : (j + 1) * rows] for j in range(n)]
    values = [_scalar(metric(cell_logits)) for cell_logits in per_cell]
    if keep and any(v != v for v in values):
        raise ValueError(_read_outside(keep.keep))
    return values


class _Kept:
    """The last ``keep`` of ``n_pos`` positions' logits at their places, NaN before them, in one buffer reused
    by every chunk (the NaN are written once)."""

    def __init__(self, keep: int, n_pos: int):
        self.keep, self.n_pos, self.buffer = keep, n_pos, None

    def padded(self, logits: Tensor) -> Tensor:
        rows = logits.shape[0]
        if self.buffer is None or self.buffer.shape[0] < rows:
            self.buffer = logits.new_full((rows, self.n_pos, logits.shape[2]), float("nan"))
        out = self.buffer[:rows]
        out[:, self.n_pos - logits.shape[1] :] = logits
        return out


def _check_keep(model, tokens, metric, logits_to_keep: int) -> _Kept | None:
    """``logits_to_keep`` checked; None when it is 0. Runs the metric on the corrupted run's logits with the
    other positions NaN, so a metric that reads them fails before the sweep."""
    from tl_vlm.hooked_vlm import HookedVLM

    if not logits_to_keep:
        return None
    if logits_to_keep < 0 or not isinstance(getattr(model, "model", model), HookedVLM):
        raise ValueError("logits_to_keep must be a positive number of last positions, on a HookedVLM or its tower view")
    with torch.no_grad():
        logits = model(tokens)
    kept = min(logits_to_keep, logits.shape[1])
    if _scalar(metric(_Kept(kept, logits.shape[1]).padded(logits[:, -kept:]))) != _scalar(metric(logits)):
        raise ValueError(_read_outside(logits_to_keep))
    return _Kept(kept, logits.shape[1])


def _read_outside(keep: int) -> str:
    return (f"patching_metric read logits outside the last {keep} positions (logits_to_keep={keep}, the others are "
            "NaN); raise logits_to_keep to cover every position the metric reads, or leave it at 0 (all)")


def _scalar(value) -> float:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(
            f"patching_metric must return a scalar per patched run, got shape {tuple(value.shape)} (tl_vlm.patching "
            "follows TL's reduce='scalar'; average a per-prompt metric yourself)"
        )
    return value.item()


def _repeat(tokens, n: int):
    """``n`` copies of the corrupted batch, copy after copy (each keeps its images)."""
    if n == 1:
        return tokens
    if isinstance(tokens, TowerInputs):
        return TowerInputs(_repeat(tokens.inputs, n), torch.Size([n * tokens.shape[0], *tokens.shape[1:]]))
    if isinstance(tokens, VLMInputs):
        # The whole batch repeats, so every field (per row, per image, packed patches) repeats along its first axis,
        # images staying in their rows' order; no row layout is needed.
        tokens = tokens.unsqueezed()
        layout = {k: None if v is None else v * n for k, v in (("row_images", tokens.row_images), ("row_videos", tokens.row_videos))}
        return replace(tokens, **{k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in tokens.as_kwargs().items()}, **layout)
    if isinstance(tokens, Tensor):
        tokens = tokens if tokens.ndim == 2 else tokens[None]
        return tokens.repeat(n, 1)
    raise TypeError(f"unsupported corrupted input of type {type(tokens).__name__}")


def _index(model, tokens, activation_name, axis_names, index_df) -> tuple[pd.DataFrame, tuple[int, ...] | None]:
    """The cells (TL's index_df, in TL's order) and the output shape (None: flat, one value per row)."""
    if index_df is not None:
        if axis_names is not None:
            raise ValueError("pass index_axis_names or index_df, not both (as TL)")
        return index_df, None
    if axis_names is None:
        raise ValueError("pass index_axis_names (e.g. ('layer', 'pos')) or an index_df of cells")
    heads = model.cfg.n_heads
    if activation_name in ("k", "v") and model.cfg.n_key_value_heads is not None:
        heads = model.cfg.n_key_value_heads
    pos = tokens.shape[-1]
    ranges = {"layer": model.cfg.n_layers, "pos": pos, "src_pos": pos, "dest_pos": pos, "head_index": heads, "head": heads}
    shape = tuple(ranges[name] for name in axis_names)
    return pd.DataFrame(list(itertools.product(*(range(s) for s in shape))), columns=list(axis_names)), shape


def _default_batch_size(model, tokens, n_cells: int) -> int:
    """Cells per forward from a rough estimate of one cell's activations (logits and attention patterns
    dominate) against a budget: half the free memory of a GPU, ``CPU_BUDGET_BYTES`` on CPU."""
    cfg = getattr(model, "model", model).cfg  # a tower view's model holds the logits' width
    device = torch.device(model.cfg.device)
    elem = torch.finfo(cfg.dtype).bits // 8 if cfg.dtype.is_floating_point else 4
    batch, pos = len(tokens), tokens.shape[-1]
    per_cell = batch * pos * (cfg.d_vocab + model.cfg.n_heads * pos + 8 * model.cfg.d_model + 2 * (model.cfg.d_mlp or 0)) * elem
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else CPU_BUDGET_BYTES
    return max(1, min(n_cells, budget // max(per_cell, 1)))


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate"))
