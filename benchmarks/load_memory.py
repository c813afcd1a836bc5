"""Load cost: wall time and peak RSS of HookedVLM.from_pretrained vs HF from_pretrained on a saved checkpoint.

Each load runs in a fresh subprocess; peak RSS is measured above the process's RSS after imports.
Usage: python benchmarks/load_memory.py --family llava|blip2|qwen2_vl [--shape design] [--repeats 3]
(design checkpoints, fp32: LLaVA ~190 MB, BLIP-2 ~190 MB, Qwen2-VL ~390 MB)
Writes benchmarks/results/load_memory_<family>_<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import FAMILIES, SHAPES, save_checkpoint, write_report

CHILD = r"""
import json, resource, sys, time, torch
import transformers, tl_vlm
from transformers import AutoModelForImageTextToText
from tl_vlm import HookedVLM
torch.set_num_threads(2)
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss_mb()
start = time.perf_counter()
if sys.argv[1] == "hf":
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[2])
else:
    model = HookedVLM.from_pretrained(sys.argv[2], load_processor=False)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak - base, "after_rss_mb": rss_mb() - base, "weights_mb": n_bytes / 2**20}))
"""


def measure(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="design", choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(args.family, args.shape, Path(tmp))
        rows = []
        for kind in ("hf", "tl_vlm") * args.repeats:
            rows.append({"loader": kind, **measure(kind, Path(tmp))})
    summary = []
    for kind in ("hf", "tl_vlm"):
        mine = [r for r in rows if r["loader"] == kind]
        summary.append({
            "loader": kind,
            "wall_s": min(r["wall_s"] for r in mine),
            "peak_rss_mb": min(r["peak_rss_mb"] for r in mine),
            "weights_mb": mine[0]["weights_mb"],
        })
    summary[1]["peak_ratio_to_hf"] = summary[1]["peak_rss_mb"] / summary[0]["peak_rss_mb"]
    summary[0]["peak_ratio_to_hf"] = 1.0
    meta = {"family": args.family, "shape": args.shape, "runs": rows}
    write_report(f"load_memory_{args.family}_{args.shape}", summary, meta)


if __name__ == "__main__":
    main()
