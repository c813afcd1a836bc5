"""Weights come only from the files HF's loader reads: the index's shards, else model.safetensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from tl_vlm import HookedVLM


def test_stray_safetensors_file_is_ignored(tmp_path, llava15):
    path = tmp_path / "ckpt"
    shutil.copytree(llava15.path, path)
    stray = {k: torch.randn_like(v) for k, v in load_file(path / "model.safetensors").items()}
    save_file(stray, path / "old-weights.safetensors")
    model = HookedVLM.from_pretrained(path)
    batch = llava15.batch()
    with torch.no_grad():
        assert torch.equal(model(batch), llava15.model(batch))


def test_sharded_checkpoint_follows_its_index(tmp_path, llava15):
    path = tmp_path / "sharded"
    hf = LlavaForConditionalGeneration.from_pretrained(llava15.path)
    hf.save_pretrained(path, max_shard_size="100KB")
    llava15.model.processor.save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    batch = llava15.batch()
    with torch.no_grad():
        assert torch.equal(HookedVLM.from_pretrained(path)(batch), llava15.model(batch))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match="names weight files that are not in"):
        HookedVLM.from_pretrained(path)
