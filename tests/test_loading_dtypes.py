"""Loaders take dtypes by name and "auto" (the checkpoint's dtype), as HF's do."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tl_vlm import HookedVLM
from tl_vlm.zoo.toys import toy_checkpoint


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    hf = LlavaForConditionalGeneration.from_pretrained(toy_checkpoint("tl-vlm/toy-llava"), dtype=torch.bfloat16)
    hf.save_pretrained(path)
    HookedVLM.from_pretrained("tl-vlm/toy-llava").processor.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("name, dtype", [("float16", torch.float16), ("bf16", torch.bfloat16), ("torch.float32", torch.float32)])
def test_dtype_names(name, dtype):
    model = HookedVLM.from_pretrained("tl-vlm/toy-llava", dtype=name)
    assert model.W_E.dtype == model.vision.W_Q.dtype == model.cfg.dtype == dtype


def test_auto_is_the_checkpoints_dtype(bf16_checkpoint):
    path, hf = bf16_checkpoint
    assert HookedVLM.from_pretrained(path, dtype="auto").W_E.dtype == torch.bfloat16
    assert HookedVLM.from_pretrained("tl-vlm/toy-llava", dtype="auto").W_E.dtype == torch.float32
    assert HookedVLM.from_hf_model(hf, dtype="auto").W_E.dtype == torch.bfloat16
    assert HookedVLM.from_hf_model(hf, dtype="float32").W_E.dtype == torch.float32


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int3'.*bfloat16"):
        HookedVLM.from_pretrained("tl-vlm/toy-llava", dtype="int3")
