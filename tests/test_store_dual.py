"""The store and CLI on dual encoders: extraction from both towers of a HookedCLIP equals its own cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from tl_vlm import HookedCLIP
from tl_vlm.cli import main
from tl_vlm.store import ExtractConfig, extract, load
from tl_vlm.zoo.tiny_clip import build_tiny_clip

HOOKS = ["vision.hook_embed_out", "text.hook_embed_out", "text.blocks.1.hook_resid_post", "vision.blocks.0.hook_resid_post"]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", "clip")


@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_extraction_from_both_towers_equals_the_cache(dataset, clip_path, tmp_path, pooling):
    config = ExtractConfig(model_path=str(clip_path), output_db=str(tmp_path / "out.db"), modules=HOOKS, batch_size=2,
                           pooling_method=pooling,
                           dataset={"local_dataset_path": str(dataset / "data.csv"), "image_dataset_path": str(dataset / "images")})
    assert extract(config, progress=False) == {"done": 5, "skipped": 0, "failed": 0}
    stored = load(tmp_path / "out.db")
    assert set(stored.layer) == set(HOOKS) and set(stored.architecture) == {"clip"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedCLIP.from_pretrained(clip_path)
    from PIL import Image

    row = stored[stored.image_id == stored.image_id.iloc[0]]
    image = Image.open(row.image_path.iloc[0]).convert("RGB")
    inputs = model.prepare(images=[image], text=[row.prompt.iloc[0]])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    for hook in HOOKS:
        tensor = row[row.layer == hook].tensor.iloc[0]
        expected = cache[hook][0]
        if expected.ndim == 1:
            expected = expected[None]
        elif pooling == "mean":
            expected = expected.mean(0, keepdim=True)
        else:
            expected = expected[None]
        assert torch.allclose(tensor.float(), expected, atol=1e-5), hook


def test_hooks_command_lists_dual_encoder_names(clip_path, capsys):
    assert main(["hooks", str(clip_path), "--shapes", "--filter", r"^(text|vision)\.hook_embed_out$"]) == 0
    out = capsys.readouterr().out
    assert "text.hook_embed_out" in out and "(1, 24)" in out
