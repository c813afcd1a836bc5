"""The benchmark scripts still run (tiny shapes, one repeat). Nothing is timed or compared here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def run_script(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def run(script: str, *args: str) -> Path:
        monkeypatch.setattr(sys, "argv", [script, *args])
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
        return tmp_path

    return run


@pytest.mark.parametrize("family", ["llava", "blip2", "qwen2_vl"])
def test_overhead(run_script, family):
    out = run_script("overhead.py", "--family", family, "--shape", "tiny", "--repeats", "1", "--warmup", "0", "--generate", "2")
    report = json.loads((out / f"overhead_{family}_tiny_cpu_fp32.json").read_text())
    runs = {row["run"] for row in report["rows"]}
    assert {"tl_vlm forward", "tl_vlm run_with_cache all", "vlm-lens-style hooks (hf)", "tl_vlm generate"} <= runs
    assert report["meta"]["generated_tokens"] == {"hf": 2, "tl_vlm": 2}
    assert ("tl bridge forward" in runs) == (family == "llava")


def test_load_memory(run_script):
    out = run_script("load_memory.py", "--family", "qwen2_vl", "--shape", "tiny", "--repeats", "1")
    rows = json.loads((out / "load_memory_qwen2_vl_tiny.json").read_text())["rows"]
    assert [row["loader"] for row in rows] == ["hf", "tl_vlm"]


def test_extract_throughput(run_script):
    out = run_script("extract_throughput.py", "--family", "blip2", "--shape", "tiny", "--images", "2")
    rows = json.loads((out / "extract_blip2_tiny.json").read_text())["rows"]
    assert len(rows) == 3
