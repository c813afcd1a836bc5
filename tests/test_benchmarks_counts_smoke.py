"""benchmarks/overhead_counts.py and instructions.py still run (tiny shape, one repeat) and report their work counts.
Nothing is timed or compared here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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


@pytest.mark.skipif(not (shutil.which("valgrind") and shutil.which("cc") and Path("/usr/include/valgrind/callgrind.h").exists()),
                    reason="benchmarks/instructions.py needs valgrind, its headers and a C compiler (Debian: valgrind gcc)")
def test_instructions(run_script):  # noqa: F811
    out = run_script("instructions.py", "--family", "qwen2_vl", "--shape", "tiny", "--runs", "1")
    rows = {row["run"]: row for row in json.loads((out / "instructions_qwen2_vl_tiny_cpu_fp32.json").read_text())["rows"]}
    assert list(rows) == ["hf (default attention)", "tl_vlm forward", "tl_vlm run_with_cache all",
                          "tl_vlm run_with_cache resid_post"]
    assert rows["hf (default attention)"]["ratio"] == 1.0
    assert rows["tl_vlm run_with_cache all"]["instructions_M"] > rows["tl_vlm forward"]["instructions_M"] > 1
