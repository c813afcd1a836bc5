"""The main job runs end to end and its numbers are the model's numbers."""

from __future__ import annotations

import json

from tl_vlm.cli import main


def test_demo_runs_on_a_checkpoint_folder(tmp_path, checkpoints):
    """Any checkpoint folder, here a random-init one (the default toy is in tests/test_demo.py)."""
    out = tmp_path / "demo"
    assert main(["demo", str(checkpoints["llava15"]), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["logits_max_abs_diff"] <= 1e-4
    lang = report["patching"]["language_resid_pre_at_image_positions"]
    assert abs(lang[0] - 1.0) < 1e-4, "patching every image position before layer 0 restores the clean run"
    vision = report["patching"]["vision_resid_pre"]
    assert all(abs(v - 1.0) < 1e-4 for v in vision), "the whole image stream up to feature layer -2 carries the image"
    last = max(r["layer"] for r in report["vision_head_ablation"])
    assert all(r["logit_change"] == 0.0 for r in report["vision_head_ablation"] if r["layer"] == last), (
        "heads of the last vision layer act after feature layer -2 and cannot matter"
    )
    assert any(abs(r["logit_change"]) > 1e-4 for r in report["vision_head_ablation"])
    assert (out / "report.md").read_text().startswith("# tl_vlm demo")
    assert (out / "report.html").exists() and all((out / name).exists() for name in report["figures"].values())


def test_hooks_command_lists_names(checkpoints, capsys):
    assert main(["hooks", str(checkpoints["llava15"]), "--filter", r"^vision\.blocks\.0\.attn\.hook_pattern$"]) == 0
    assert capsys.readouterr().out.split() == ["vision.blocks.0.attn.hook_pattern"]
    assert main(["hooks", "tl-vlm/toy-qwen2-vl", "--shapes", "--dtype", "bf16", "--filter", r"^blocks\.0\.hook_resid_post$"]) == 0
    name, shape = capsys.readouterr().out.split(maxsplit=1)
    assert name == "blocks.0.hook_resid_post" and shape.strip().startswith("(1,") and shape.strip().endswith(", 128)")
