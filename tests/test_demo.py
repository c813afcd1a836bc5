"""`tl-vlm demo` on the shipped toys: it exits 0, writes its report and figures, and the numbers that hold for any
checkpoint (whatever it learned) hold. No answer or accuracy is pinned: the toys get retrained."""

from __future__ import annotations

import json

import pytest

from tl_vlm.cli import main
from tl_vlm.demo.report import write_report
from tl_vlm.demo.tasks import COLOUR, WORLD

REPORT_KEYS = {"model", "architecture", "notes", "question", "truth", "answer", "correct", "scene", "fidelity",
               "patching", "localization", "vision_head_ablation", "hook_counts", "figures", "seconds"}
PATCHING_KEYS = {"metric", "answer_tokens", "logit_diff", "language_resid_pre_at_image_positions", "vision_resid_pre",
                 "layer_position", "positions"}
REGION_KEYS = {"language_resid_pre_object_region", "language_resid_pre_rest_of_image",
               "vision_resid_pre_object_region", "vision_resid_pre_rest_of_image"}


def _run(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "demo"
    assert main(["demo", *args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert PATCHING_KEYS <= set(report["patching"])
    for name in report["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == len(report["figures"])
    assert report["question"] in page and report["truth"] in page
    assert (out / "report.md").read_text().startswith("# tl_vlm demo")
    return report, page


def _common_checks(report: dict, capsys, task=COLOUR) -> str:
    truth = task.scenes(0)[0]
    assert report["task"] == task.name
    assert report["question"] == truth.question and report["truth"] == truth.answer
    assert report["scene"]["corrupted"]["answer"] != report["truth"]
    assert report["fidelity"]["logits_max_abs_diff"] <= 1e-4
    assert report["fidelity"]["worst_hidden_max_abs_diff"] <= 1e-4
    p = report["patching"]
    assert abs(p["language_resid_pre_at_image_positions"][0] - 1.0) < 1e-4, (
        "the image positions entering layer 0 are all the language model sees of the image")
    assert all(abs(v - 1.0) < 1e-4 for v in p["vision_resid_pre"]), "the whole vision stream carries the whole image"
    grid = p["layer_position"]
    assert len(grid) == len(p["language_resid_pre_at_image_positions"]) and len(grid[0]) == len(p["positions"])
    first_image = next(i for i, t in enumerate(p["positions"]) if t in ("<image>", "<|image_pad|>"))
    assert all(abs(v) < 1e-6 for v in grid[0][:first_image]), "text before the image is the same in both runs"
    loc = report["localization"]
    assert isinstance(loc["hit"], bool) and 0 < loc["chance"] < 1
    assert len(loc["map"]) == len(p["language_resid_pre_at_image_positions"]) + 1
    assert 0 <= loc["pointing_game"]["hits"] <= loc["pointing_game"]["scenes"]
    printed = capsys.readouterr().out
    assert f"Q: {report['question']}" in printed and "A: " in printed and "pointing game" in printed
    return printed


def test_demo_default_toy(tmp_path, capsys):
    report, _ = _run(tmp_path)
    assert report["model"] == "tl-vlm/toy-llava-bias"
    printed = _common_checks(report, capsys, WORLD)
    p = report["patching"]
    assert REGION_KEYS <= set(p) and 0 < p["object_region_tokens"] < p["image_tokens"]
    # A minimal pair: only the object's pixels differ, so at the vision input only the object's patches matter.
    assert abs(p["vision_resid_pre_object_region"][0] - 1.0) < 1e-4
    assert abs(p["vision_resid_pre_rest_of_image"][0]) < 1e-4
    # A hit means the peak's patch holds pixels of the drawn shape (not just of its bounding box).
    x0, y0, x1, y1 = (int(v) for v in report["localization"]["peak"]["box"])
    clean = WORLD.scenes(0)[0]
    on_shape = any(clean.image.getpixel((x, y)) != WORLD.background(clean) for x in range(x0, x1) for y in range(y0, y1))
    assert report["localization"]["hit"] == on_shape
    # The biased-world toy's story, live on a few held-out scenes and stored (tl_vlm beside the HF reference).
    story = report["hallucination"]
    assert len(story["live"]["scenes"]) == 8 and set(story["stored"]) >= {"tl_vlm", "reference_hf"}
    assert "the hallucination story" in printed
    last = max(r["layer"] for r in report["vision_head_ablation"])
    assert all(r["logit_change"] == 0.0 for r in report["vision_head_ablation"] if r["layer"] == last), (
        "heads of the last vision layer act after feature layer -2 and cannot matter")
    assert set(report["figures"]) == {"scene", "localization", "confidence_map", "patching_curves",
                                      "patching_layer_position"}
    # The page escapes what the model says (the HTML template autoescapes); the Markdown keeps it verbatim.
    write_report({**report, "answer": "<i>white</i>"}, tmp_path / "demo")
    assert "&lt;i&gt;white&lt;/i&gt;" in (tmp_path / "demo" / "report.html").read_text()
    assert "'<i>white</i>'" in (tmp_path / "demo" / "report.md").read_text()


@pytest.mark.parametrize("toy", ["tl-vlm/toy-blip2", "tl-vlm/toy-qwen2-vl"])
def test_demo_other_toys(tmp_path, capsys, toy):
    report, _ = _run(tmp_path, toy)
    assert report["model"] == toy
    _common_checks(report, capsys)
    if toy.endswith("blip2"):
        assert not REGION_KEYS & set(report["patching"]), "Q-Former queries have no region"
        assert any("Q-Former queries" in note for note in report["notes"])
        assert "pixel" in report["localization"]["peak"]
    else:
        p = report["patching"]
        assert REGION_KEYS <= set(p)
        assert abs(p["vision_resid_pre_object_region"][0] - 1.0) < 1e-4  # 2x2 merge blocks map back to their patches
        assert abs(p["vision_resid_pre_rest_of_image"][0]) < 1e-4
