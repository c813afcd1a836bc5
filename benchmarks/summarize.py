"""One Markdown summary of every overhead / load / extraction report in a results folder.

Usage: python benchmarks/summarize.py [benchmarks/results] > summary.md   (gpu.sh writes results/gpu/SUMMARY.md)
Overhead tables: one column per family and shape, each cell the median ratio to HF (default attention), the
IQR of that ratio in brackets and the ratio of the minima in parentheses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    overhead = {}
    for path in sorted(folder.glob("overhead_*.json")):
        report = json.loads(path.read_text())
        meta = report["meta"]
        overhead.setdefault((meta["device"], meta["dtype"]), []).append(report)
    for (device, dtype), reports in overhead.items():
        columns = [f"{r['meta']['family']} {r['meta']['shape']} ({r['meta']['tokens']} tok)" for r in reports]
        runs = list(dict.fromkeys(row["run"] for r in reports for row in r["rows"]))
        print(f"## Overhead, {device} {dtype}: median ratio to HF [IQR of the ratio] (ratio of minima)\n")
        print("| run | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for run in runs:
            cells = []
            for r in reports:
                row = next((row for row in r["rows"] if row["run"] == run), None)
                cells.append(f"{row['ratio_to_hf']:.2f} [{row['iqr_ratio']:.2f}] ({row['min_ratio']:.2f})" if row else "n/a")
            print(f"| {run} | " + " | ".join(cells) + " |")
        hf = [f"{r['meta']['family']} {r['meta']['shape']}: {r['rows'][0]['median_ms']:.1f} ms" for r in reports]
        print("\nHF forward medians: " + "; ".join(hf) + "\n")
        for r in reports:
            for peer, why in r["meta"]["skipped"].items():
                print(f"- {r['meta']['family']} {r['meta']['shape']}: no {peer} rows ({why})")
        print()
    for kind, title in (("load_memory", "Loading"), ("extract", "Extraction throughput")):
        for path in sorted(folder.glob(f"{kind}_*.json")):
            print(f"## {title}: {path.stem}\n")
            print(path.with_suffix(".md").read_text().split("\n\n", 2)[2])


if __name__ == "__main__":
    main()
