"""Random small configurations of every family (tests/random_configs.py) against HF, built in memory and saved:
fp32 logits and every hidden state of every tower within 1e-4, float16 / bfloat16 logits equal to HF's for both
loaders, a full cache and a HF model cast after loading. Fixed seed: the same draws every run."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import (
    ATOL,
    REGISTRY,
    HalfPrecision,
    assert_hidden_states_match,
    hf_run,
    logits_mask,
    max_diff,
    quiet,
)
from random_configs import Draw, draws

from tl_vlm import HookedVLM

DRAWS = draws({"llava": 6, "llava_next": 2, "qwen2_vl": 2, "qwen2_5_vl": 2, "blip2": 4, "instructblip": 2, "mllama": 2},
              seed=26)
PARAMS = [pytest.param(d, id=f"{i}-{d.label}") for i, d in enumerate(DRAWS)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Draw -> (saved checkpoint path, HF fp32 model, its inputs); built once per draw."""
    built: dict[int, tuple] = {}

    def get(draw: Draw):
        key = id(draw)
        if key not in built:
            hf = draw.build()
            path = tmp_path_factory.mktemp("draw")
            hf.save_pretrained(path)
            built[key] = (path, hf, draw.inputs(hf))
        return built[key]

    return get


@pytest.mark.parametrize("draw", PARAMS)
def test_float32_matches_hf_in_every_tower(saved, draw):
    path, hf, inputs = saved(draw)
    model = quiet(HookedVLM.from_pretrained, path)
    entry = REGISTRY[draw.entry]
    hf_logits, hidden = hf_run(entry, hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    assert max_diff(logits, hf_logits, logits_mask(model, inputs)) <= ATOL
    assert set(hidden) == set(entry.towers), "every tower is compared"
    assert_hidden_states_match(model, cache, hidden, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("draw", PARAMS)
def test_half_precision_logits_are_hfs(saved, draw, dtype):
    path, _, inputs = saved(draw)
    diffs = HalfPrecision.load(draw.hf_class, path, dtype).logit_diffs(inputs)
    assert diffs == dict.fromkeys(diffs, 0.0), diffs
