"""Where the time of an all-hooks ``run_with_cache`` goes, in counts the load of a shared machine does not change.

Usage: python benchmarks/overhead_counts.py --family llava|blip2|qwen2_vl --shape tiny|design|real
           [--repeats 7] [--threads 1] [--bare]
Writes benchmarks/results/overhead_counts_<family>_<shape>_cpu_fp32.{json,md}.

Per run, next to wall time (median over interleaved rounds, as overhead.py): CPU time of the process (user + sys,
getrusage; with one thread it does not grow with other processes' load as wall time does), minor page faults (fresh
memory the kernel must map and zero), and from one extra run each: aten ops (torch.profiler), bytes the ops
allocated (profile_memory) and Python function calls (cProfile). ``run_with_cache all, fresh memory`` is the same
run with reused memory turned off (components/reused_storage.py: attention scores / pattern, MLP activations,
residual sums). Both models live in one process, so glibc's heap is shared: the fresh-memory row can fault less
here than in a process of its own (compare with a run of the previous commit).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import platform
import pstats
import random
import resource
import statistics
import time

import torch

from common import FAMILIES, SHAPES, build, inputs_for, sibling, write_report
from overhead import _bridge, _nnsight
from tl_vlm import HookedVLM
from tl_vlm.components.attention import Attention
from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.mlp import MLP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="design", choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bare", action="store_true", help="only HF, forward and the all-hooks cache of one model: "
                        "the allocator's state is then this code's own (run once per version to compare faults)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, processor = build(args.family, args.shape)
    model = HookedVLM.from_hf_model(hf)
    inputs = inputs_for(processor, "cpu", torch.float32)
    runs = {
        "hf (default attention)": lambda: hf(**inputs),
        "tl_vlm forward": lambda: model(**inputs),
        "tl_vlm run_with_cache all": lambda: model.run_with_cache(**inputs),
    }
    if not args.bare:
        fresh = HookedVLM.from_hf_model(hf)  # the same weights, every activation in fresh memory (as before reuse)
        for module in (m for m in fresh.modules() if isinstance(m, (Attention, MLP, TransformerBlock))):
            module.reused.empty = lambda *a: None
        resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
        runs["tl_vlm run_with_cache all, fresh memory"] = lambda: fresh.run_with_cache(**inputs)
        runs["tl_vlm run_with_cache resid_post"] = lambda: model.run_with_cache(**inputs, names_filter=resid)
    skipped = {}
    for name, fn in () if args.bare else (("tl bridge", _bridge), ("nnsight", _nnsight)):
        try:
            peer = fn(args.family, sibling(hf), inputs)
            runs.update({f"{name} {row}": f for row, f in peer.items() if row != "forward"})
        except Exception as err:  # an optional peer: report why its rows are missing and go on
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"

    with torch.no_grad():
        for fn in runs.values():  # warm up (twice: the second run is the first to find reusable memory)
            fn(), fn()
        work = {name: _work(fn) for name, fn in runs.items()}
        gc.collect()
        samples = {name: [] for name in runs}
        order = list(runs)
        for round_ in range(args.repeats):
            # A new order every round (seeded): a row that always ran right after the same other row measured up to 8%
            # apart from an identical row that did not (same instruction count under callgrind).
            random.Random(round_).shuffle(order)
            for name in order:
                samples[name].append(_measured(runs[name]))
    med = {name: [statistics.median(x) for x in zip(*s)] for name, s in samples.items()}
    hf_wall, hf_cpu, hf_faults = med["hf (default attention)"]
    rows = []
    for name, (wall, cpu, faults) in med.items():
        rows.append({
            "run": name, "wall_ms": 1e3 * wall, "wall_ratio": wall / hf_wall, "cpu_ms": 1e3 * cpu,
            "cpu_ratio": cpu / hf_cpu, "page_faults": faults, "extra_faults": faults - hf_faults, **work[name],
        })
    meta = {
        "family": args.family, "shape": args.shape, "threads": args.threads, "repeats": args.repeats, "bare": args.bare,
        "tokens": int(inputs["input_ids"].shape[1]), "load_avg_1m": _load(), "skipped": skipped,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    write_report(f"overhead_counts_{args.family}_{args.shape}_cpu_fp32", rows, meta)


def _measured(fn) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys) and minor page faults of one call (its result freed inside)."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, after.ru_minflt - before.ru_minflt


def _work(fn) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    return {
        "aten_ops": sum(e.name.startswith("aten::") for e in events),
        # What each op allocated beyond what it freed, outside the ops it called, summed over op calls.
        "alloc_mb": sum(max(e.self_cpu_memory_usage, 0) for e in events if e.name != "[memory]") / 1e6,
        "python_calls": pstats.Stats(profiler).total_calls,
    }


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


if __name__ == "__main__":
    main()
