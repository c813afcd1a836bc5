"""Instructions executed per run (valgrind's callgrind), next to HF's: a count a shared machine's load cannot move.

Usage: python benchmarks/instructions.py --family llava|blip2|qwen2_vl --shape tiny|design|real [--runs 3] [--peers]
Writes benchmarks/results/instructions_<family>_<shape>_cpu_fp32.{json,md}. Needs valgrind, its headers and a C
compiler (Debian: valgrind, gcc); it re-runs itself under callgrind with instrumentation off until the models are
built and warmed up, then counts each row's runs alone (zeroed before, dumped after; one process, one thread).

Why: on this project's shared 2-core VM, wall and even CPU time of a few-millisecond forward drift by 10-30% between
rounds, and two identical rows measured 8% apart by position in the round. Instruction counts are exact and
repeatable; they are not time (memory stalls, vector width and cache misses weigh differently), so RESULTS.md shows
them beside timings, never instead of them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=("llava", "blip2", "qwen2_vl"))
    parser.add_argument("--shape", default="tiny", choices=("tiny", "design", "real"))
    parser.add_argument("--runs", type=int, default=3, help="runs counted per row (the count is per run)")
    parser.add_argument("--peers", action="store_true", help="also TL's bridge and nnsight (slow under valgrind)")
    args = parser.parse_args()
    marks = os.environ.get("TL_VLM_CALLGRIND_MARKS")
    if marks:
        _count(args, ctypes.CDLL(marks))
    else:
        _launch(args)


def _launch(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / "libmarks.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", library, HERE / "callgrind_marks.c"], check=True)
        out = Path(tmp) / "cg.out"
        subprocess.run(
            ["valgrind", "-q", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             __file__, *sys.argv[1:]],
            env={**os.environ, "TL_VLM_CALLGRIND_MARKS": str(library)}, check=True,
        )
        counts = {}
        dumps = sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.suffix[1:]))
        for dump in dumps:  # one dump per row, in the rows' order, labelled with the row's name
            text = dump.read_text()
            label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
            total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if label and total:
                counts[label.group(1)] = int(total.group(1)) / args.runs
    sys.path.insert(0, str(HERE))
    from common import write_report

    hf = counts["hf (default attention)"]
    rows = [{"run": name, "instructions_M": n / 1e6, "ratio": n / hf} for name, n in counts.items()]
    meta = {"family": args.family, "shape": args.shape, "runs": args.runs, "counter": "valgrind callgrind Ir"}
    write_report(f"instructions_{args.family}_{args.shape}_cpu_fp32", rows, meta)


def _count(args, marks) -> None:
    sys.path.insert(0, str(HERE))
    import torch
    from common import build, inputs_for, sibling
    from overhead import _bridge, _nnsight
    from tl_vlm import HookedVLM

    torch.set_num_threads(1)
    hf, processor = build(args.family, args.shape)
    model = HookedVLM.from_hf_model(hf)
    inputs = inputs_for(processor, "cpu", torch.float32)
    resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    runs = {
        "hf (default attention)": lambda: hf(**inputs),
        "tl_vlm forward": lambda: model(**inputs),
        "tl_vlm run_with_cache all": lambda: model.run_with_cache(**inputs),
        "tl_vlm run_with_cache resid_post": lambda: model.run_with_cache(**inputs, names_filter=resid),
    }
    for name, peer in (("tl bridge", _bridge), ("nnsight", _nnsight)) if args.peers else ():
        try:
            rows = peer(args.family, sibling(hf), inputs)
        except Exception as err:  # an optional peer that refuses this family: say so, count the rest
            print(f"{name} skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
            continue
        runs.update({f"{name} {row}": fn for row, fn in rows.items() if row != "forward"})
    with torch.no_grad():
        for fn in runs.values():  # warm up (twice: the second run is the first to find reusable memory)
            fn(), fn()
        marks.marks_start()
        for name, fn in runs.items():
            marks.marks_zero()
            for _ in range(args.runs):
                fn()
            marks.marks_dump(name.encode())


if __name__ == "__main__":
    main()
