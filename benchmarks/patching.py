"""Activation-patching sweeps: tl_vlm.patching (many cells per forward, first-position shortcut) against
TransformerLens' own loop (``transformer_lens.patching``: one forward per cell) on the same HookedVLM and inputs.

Usage: python benchmarks/patching.py --family llava|blip2|qwen2_vl --shape tiny|design|real
           [--threads 2] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--sample 12] [--windows 4]
           [--window 8] [--rows NAME ...] [--repeats 3] [--batch-size N] [--clock wall|process] [--quick]
Writes benchmarks/results/patching_<family>_<shape>_<device>_<dtype>.{json,md}.

Rows (seconds per sweep; ``speedup`` = TL's time / tl_vlm's for the same cells):
- language resid_pre [layer, pos], the whole grid. TL's loop costs the same forward per cell, so its time is
  measured on ``--sample`` cells and scaled to the grid; tl_vlm's cost per cell depends on the cell (later
  positions and layers are cheaper), so it is measured on ``--windows`` windows of ``--window`` consecutive
  positions at every layer, spread over the sequence, and scaled to the grid (each row says what was timed;
  ``--window 100000`` times the whole grid).
- the same with ``logits_to_keep=1`` (the metric reads the last position only; opt-in: the unembedding of the
  other positions is skipped).
- the same sample of cells without the shortcut (batching alone), and TL's loop on it.
- language head outputs at all positions [layer, head] and vision resid_pre on a sample: whole runs for both.
The max abs difference from TL's values on the sampled cells is reported with each row. Rounds alternate
the two sides (medians over ``--repeats``); ``--quick`` is the smoke test's one round at the tiny shape.
``--clock process`` (CPU only) times with the process's CPU time instead of the wall clock: on a shared machine
the time this process waits for a core does not count, so with ``--threads 1`` the ratio is the work's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching
from transformer_lens.patching import layer_pos_patch_setter

from common import DTYPES, FAMILIES, SHAPES, build, inputs_for, write_report
from tl_vlm import HookedVLM, VLMInputs
from tl_vlm import patching


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="design", choices=SHAPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sample", type=int, default=12, help="cells of TL's loop timed and scaled to the grid")
    parser.add_argument("--windows", type=int, default=4, help="position windows tl_vlm's grid time is measured on")
    parser.add_argument("--window", type=int, default=10, help="positions per window (a multiple of the cells per forward)")
    parser.add_argument("--rows", nargs="*", default=None, help="only the rows whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="cells per forward (default: tl_vlm's estimate)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="process: CPU time of this process (CPU only; load on other cores does not count)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 4 sampled cells, one round, one thread")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.sample, args.repeats, args.threads, args.window = "tiny", 4, 1, 1, 10**6
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU work; on a GPU use the wall clock")
    clock = time.process_time if args.clock == "process" else time.perf_counter

    hf, processor = build(args.family, args.shape)
    hf.to(device=device, dtype=dtype)
    model = HookedVLM.from_hf_model(hf)
    clean, corrupt = (VLMInputs.from_mapping(inputs_for(processor, device, dtype, seed=s)) for s in (0, 1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
    token = int(logits[0, -1].argmax())

    def metric(out):
        return out[0, -1, token].float() - out[0, -1].float().mean()

    n_layers, n_pos = model.cfg.n_layers, corrupt.shape[-1]
    grid = n_layers * n_pos
    # tl_vlm's cost per cell falls with the cell's position and layer, so it is timed on whole windows of the grid
    # (every layer, ``--window`` consecutive positions, windows spread over the sequence) and scaled to the grid.
    windows = _windows(n_layers, n_pos, args.windows, args.window)
    sample = windows.iloc[_picks(len(windows), args.sample)].reset_index(drop=True)
    sweep = dict(patch_setter=layer_pos_patch_setter, activation_name="resid_pre", index_df=sample)
    ours_kw = {"batch_size": args.batch_size}

    def timed(fn):
        def run():
            start = clock()
            with torch.no_grad():
                out = fn()
            sync()
            return clock() - start, out
        return run

    vision = model.tower("vision")
    with torch.no_grad():
        _, vision_cache = vision.run_with_cache(clean)
    corrupt_v = vision.inputs(corrupt)
    v_sample = _spread(vision.cfg.n_layers, corrupt_v.shape[-1], args.sample)
    v_sweep = dict(patch_setter=layer_pos_patch_setter, activation_name="resid_pre", index_df=v_sample)
    pairs = {
        "language resid_pre, whole grid": (
            timed(lambda: tl_patching.generic_activation_patch(model, corrupt, cache, metric, **sweep)),
            timed(lambda: patching.generic_activation_patch(model, corrupt, cache, metric, **{**sweep, "index_df": windows}, **ours_kw)),
            grid / len(sample), grid / len(windows),
        ),
        "language resid_pre, whole grid, logits_to_keep=1": (
            timed(lambda: tl_patching.generic_activation_patch(model, corrupt, cache, metric, **sweep)),
            timed(lambda: patching.generic_activation_patch(model, corrupt, cache, metric, **{**sweep, "index_df": windows},
                                                            logits_to_keep=1, **ours_kw)),
            grid / len(sample), grid / len(windows),
        ),
        "language resid_pre, sample, batching only": (
            timed(lambda: tl_patching.generic_activation_patch(model, corrupt, cache, metric, **sweep)),
            timed(lambda: patching.generic_activation_patch(model, corrupt, cache, metric, **sweep, reuse_prefix=False, **ours_kw)),
            1.0, 1.0,
        ),
        "language head out all pos [layer, head]": (
            timed(lambda: tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric)),
            timed(lambda: patching.get_act_patch_attn_head_out_all_pos(model, corrupt, cache, metric, **ours_kw)),
            1.0, 1.0,
        ),
        "vision resid_pre, sample": (
            timed(lambda: tl_patching.generic_activation_patch(vision, corrupt_v, vision_cache, metric, **v_sweep)),
            timed(lambda: patching.generic_activation_patch(vision, corrupt_v, vision_cache, metric, **v_sweep, **ours_kw)),
            1.0, 1.0,
        ),
    }
    with torch.no_grad():  # warm up (first calls allocate and initialise)
        for _ in range(2):
            model(corrupt)
    pairs = {name: pair for name, pair in pairs.items() if args.rows is None or any(r in name for r in args.rows)}
    rows = []
    for name, (theirs, ours, scale, our_scale) in pairs.items():
        tl_times, our_times, diff = [], [], 0.0
        for _ in range(args.repeats):  # alternating rounds: drift on a shared machine hits both sides
            t, tl_out = theirs()
            tl_times.append(t * scale)
            t, our_out = ours()
            our_times.append(t * our_scale)
        if "whole grid" in name:  # TL's values on the sampled cells against the same cells of the windows
            our_out = our_out[torch.tensor(_picks(len(windows), args.sample))]
        diff = float((our_out - tl_out).abs().max())
        tl_s, our_s = statistics.median(tl_times), statistics.median(our_times)
        rows.append({"sweep": name, "cells": grid if "whole grid" in name else int(tl_out.numel()),
                     "tl_loop_s": tl_s, "tl_vlm_s": our_s, "speedup": tl_s / our_s,
                     "speedup_iqr": _iqr([a / b for a, b in zip(tl_times, our_times)]), "max_abs_diff": diff,
                     "tl_timed_on": f"{len(sample)} of {grid} cells, scaled" if scale != 1.0 else "the same cells",
                     "tl_vlm_timed_on": (f"{len(windows)} of {grid} cells ({args.windows} windows of {args.window} "
                                         "positions x every layer), scaled") if our_scale != 1.0 else "the same cells"})
        print(rows[-1])
    meta = {
        "family": args.family, "shape": args.shape, "device": str(device), "dtype": args.dtype, "threads": args.threads,
        "clock": args.clock, "tokens": n_pos, "language_layers": n_layers, "vision_rows": list(corrupt_v.shape), "repeats": args.repeats,
        "batch_size": args.batch_size, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    write_report(f"patching_{args.family}_{args.shape}_{device.type}_{args.dtype}", rows, meta)


def _spread(n_layers: int, n_pos: int, k: int) -> pd.DataFrame:
    """``k`` cells spread evenly over the [layer, pos] grid (every layer, positions from first to last)."""
    cells = [(i % n_layers, round(i * (n_pos - 1) / max(k - 1, 1))) for i in range(k)]
    return pd.DataFrame(cells, columns=["layer", "pos"])


def _windows(n_layers: int, n_pos: int, n_windows: int, width: int) -> pd.DataFrame:
    """Cells of ``n_windows`` windows of ``width`` consecutive positions, evenly spread, every layer, in TL's
    (layer, pos) order within each window; the whole grid when they cover it."""
    if n_windows * width >= n_pos:
        starts = [0]
        width = n_pos
    else:
        starts = [round(i * (n_pos - width) / max(n_windows - 1, 1)) for i in range(n_windows)]
    cells = [(layer, p) for s in starts for layer in range(n_layers) for p in range(s, s + width)]
    return pd.DataFrame(cells, columns=["layer", "pos"])


def _picks(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


if __name__ == "__main__":
    main()
