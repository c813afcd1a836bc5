"""verify with weight processing, lower precision, the CLI, and Qwen without torchvision. (That verify passes on
every entry and names the tower and layer of a perturbed weight: tests/conformance.)"""

from __future__ import annotations

import json

from tl_vlm import HookedVLM
from tl_vlm.cli import main
from tl_vlm.verify import verify


def test_verify_with_processing_and_lower_precision(llava15):
    report = verify(str(llava15.path), fold_ln=True, center_unembed=True)
    assert report.passed and report.compared == "probabilities", report.table()
    half = verify(str(llava15.path), dtype="bf16")
    assert "HF in dtype vs HF fp32, logits max|d|" in half.dtype_noise
    assert half.passed, half.table()


def test_verify_half_precision_tells_conversion_error_from_dtype_noise(llava15, capsys):
    """`tl-vlm verify --dtype bf16`: HF in bfloat16 is the reference (the conversion adds nothing: 0), HF in float32
    a row of its own, where tl_vlm and HF in bfloat16 sit at the same distance."""
    assert main(["verify", str(llava15.path), "--dtype", "bf16"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "vs HF in bfloat16: logits max|d| 0 (bit for bit)" in rows
    (fp32_row,) = [row for row in rows if row.startswith("vs HF in float32: logits max|d| ")]
    ours, hf = fp32_row.split("max|d| ")[1].split(",")[0], fp32_row.split("itself is at ")[1].split(",")[0]
    assert ours == hf and float(ours) > 0, fp32_row


def test_verify_cli_exit_status(llava15, tmp_path):
    assert main(["verify", str(llava15.path), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "verify.json").read_text())
    assert data["passed"] and (tmp_path / "verify.md").exists()


def test_qwen_prepare_and_demo_without_torchvision(tmp_path_factory, checkpoints):
    """HF's Qwen-VL processor needs torchvision for videos; images still go through model.prepare."""
    import warnings

    from tl_vlm.prompts import format_prompt
    from tl_vlm.zoo.data import sample_images

    path = checkpoints["qwen2_vl"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedVLM.from_pretrained(path)
        inputs = model.prepare(images=sample_images(2, sizes=[(40, 28), (28, 56)]),
                               text=[format_prompt(model.processor, "What colour?")] * 2)
        assert inputs.image_grid_thw.shape == (2, 3) and int(model.image_token_mask(inputs.input_ids).sum(1)[0]) > 0
        out = tmp_path_factory.mktemp("demo")
        assert main(["demo", str(path), "--out", str(out)]) == 0
