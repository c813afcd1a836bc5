"""benchmarks/overhead_counts.py still runs (tiny shape, one repeat) and reports its work counts. Nothing is timed or
compared here."""

from __future__ import annotations

import json

from test_benchmarks_smoke import run_script  # noqa: F401  (the fixture)


def test_overhead_counts(run_script):  # noqa: F811
    out = run_script("overhead_counts.py", "--family", "llava", "--shape", "tiny", "--repeats", "1")
    rows = {row["run"]: row for row in json.loads((out / "overhead_counts_llava_tiny_cpu_fp32.json").read_text())["rows"]}
    assert {"hf (default attention)", "tl_vlm run_with_cache all", "tl_vlm run_with_cache all, fresh memory"} <= set(rows)
    assert rows["tl_vlm run_with_cache all"]["aten_ops"] > rows["tl_vlm forward"]["aten_ops"] > 0
    assert all(row["python_calls"] > 0 and row["page_faults"] >= 0 for row in rows.values())


def test_overhead_counts_bare(run_script):  # noqa: F811
    out = run_script("overhead_counts.py", "--family", "blip2", "--shape", "tiny", "--repeats", "1", "--bare")
    report = json.loads((out / "overhead_counts_blip2_tiny_cpu_fp32.json").read_text())
    assert [row["run"] for row in report["rows"]] == ["hf (default attention)", "tl_vlm forward", "tl_vlm run_with_cache all"]
