"""benchmarks/patching.py still runs (its --quick mode). Nothing is timed or compared here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_patching_benchmark_quick(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["patching.py", "--quick", "--family", "qwen2_vl"])
    runpy.run_path(str(BENCHMARKS / "patching.py"), run_name="__main__")
    rows = json.loads((tmp_path / "patching_qwen2_vl_tiny_cpu_fp32.json").read_text())["rows"]
    assert [row["sweep"] for row in rows] == [
        "language resid_pre, whole grid", "language resid_pre, whole grid, logits_to_keep=1",
        "language resid_pre, sample, batching only",
        "language head out all pos [layer, head]", "vision resid_pre, sample",
    ]
    assert all(row["max_abs_diff"] < 1e-4 for row in rows)
