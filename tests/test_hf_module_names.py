"""HF module names (VLM-Lens's ``modules``) map to hook points / modules with the same output, on every family.

The reference is HF's own model: a PyTorch forward hook on each named HF module, on the registry's padded batch.
Layouts are aligned here, independently of tl_vlm: OPT's MLP runs on flattened positions, Qwen's vision tower
packs the images of a batch into one sequence (Qwen2.5-VL in window order).
"""

from __future__ import annotations

import pytest
import torch
from conformance.registry import ATOL, params
from transformers.vision_utils import get_vision_window_index

from tl_vlm.hf_names import hf_names, run_with_outputs, select_hf_modules


def hf_outputs(hf, names: list[str], inputs) -> dict[str, torch.Tensor]:
    """The first output of each named HF module (BLIP-2 calls ``post_layernorm`` again on the pooled token)."""
    modules = dict(hf.named_modules())
    got: dict[str, torch.Tensor] = {}

    def keep(name, output) -> None:
        got.setdefault(name, output[0] if isinstance(output, tuple) else output)

    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: keep(n, o)) for n in names]
    try:
        with torch.no_grad():
            hf(**inputs.as_kwargs())
    finally:
        for handle in handles:
            handle.remove()
    return got


def qwen_rows(entry, hf, packed: torch.Tensor, grid: torch.Tensor, merged: bool) -> list[torch.Tensor]:
    """HF's packed Qwen vision sequence as one tensor per image, in natural patch order (``merged``: after the
    patch merger, one row per language token)."""
    vc = hf.config.vision_config
    merge = vc.spatial_merge_size**2
    if entry.name == "qwen2_5_vl":
        order, _ = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        units = packed.view(len(order), -1, packed.shape[-1])
        natural = torch.empty_like(units)
        natural[order] = units
        packed = natural.view_as(packed)
    sizes = grid.prod(-1) // (merge if merged else 1)
    return list(packed.split(sizes.tolist()))


def assert_same(entry, hf, inputs, name: str, target: str, ours: torch.Tensor, ref: torch.Tensor, atol=ATOL) -> None:
    real = inputs.attention_mask.bool() if inputs.attention_mask is not None else None
    if entry.name.startswith("qwen") and ours.shape != ref.shape:  # packed vision rows
        rows = qwen_rows(entry, hf, ref, inputs.image_grid_thw, merged=target == "projector.hook_out")
        assert ours.shape[0] == len(rows), name
        for r, row in enumerate(rows):
            diff = (ours[r, : row.shape[0]].float() - row.float()).abs().max().item()
            assert diff <= atol, (name, target, r, diff)
        return
    if ours.shape != ref.shape:  # OPT's MLP on [batch * pos, d]
        assert ours.shape[0] * ours.shape[1] == ref.shape[0], (name, ours.shape, ref.shape)
        ours, ref = ours.reshape(ref.shape), ref
        keep = real.reshape(-1)
    else:
        keep = real if real is not None and ours.shape[:2] == real.shape else None
    diff = (ours.float() - ref.float()).abs()
    assert (diff[keep] if keep is not None else diff).max().item() <= atol, (name, target)


@pytest.mark.parametrize("name", params())
def test_every_mapped_module_equals_hf(loaded, name):
    pair = loaded(name)
    entry, model, inputs = pair.entry, pair.model, pair.batch()
    table = hf_names(model)
    modules = dict(pair.hf.named_modules())
    assert [e.name for e in table if e.name not in modules] == [], "a listed HF module does not exist"
    assert any(e.target.endswith("hook_resid_post") for e in table) and any(e.target == "unembed" for e in table)
    reference = hf_outputs(pair.hf, [e.name for e in table], inputs)
    _, ours = run_with_outputs(model, inputs, [e.target for e in table])
    for e in table:
        assert_same(entry, pair.hf, inputs, e.name, e.target, ours[e.target], reference[e.name])


@pytest.mark.parametrize("name", ["llava15", "blip2_opt", "qwen2_vl"])
def test_half_precision_is_hf_bit_for_bit(checkpoint, name):
    """Reading norms through forward hooks on our modules switches no explicit path: bfloat16 outputs are HF's."""
    from conformance.registry import REGISTRY, quiet
    from transformers import AutoModelForImageTextToText

    from tl_vlm import HookedVLM

    entry, path = REGISTRY[name], checkpoint(name)
    hf = quiet(AutoModelForImageTextToText.from_pretrained, path, dtype=torch.bfloat16).eval()
    model = quiet(HookedVLM.from_pretrained, path, dtype=torch.bfloat16)
    inputs = quiet(entry.make_cases, model, entry)["batch"]
    table = hf_names(model)
    reference = hf_outputs(hf, [e.name for e in table], inputs)
    _, ours = run_with_outputs(model, inputs, [e.target for e in table])
    for e in table:
        assert_same(entry, hf, inputs, e.name, e.target, ours[e.target], reference[e.name], atol=0)


@pytest.mark.parametrize("name", params())
def test_older_spellings_name_the_same_weights(loaded, name):
    """VLM-Lens's names (transformers < 4.52) and today's resolve to one target, and the family's weight-key
    normalisation (what loads old checkpoints) agrees that they are the same module."""
    model = loaded(name).model
    family = type(model)
    for e in hf_names(model):
        if e.legacy is not None:
            assert family.normalize_key(e.legacy + ".") == family.normalize_key(e.name + "."), e
            assert select_hf_modules(model, [e.legacy]) == ({e.legacy: e.target}, [])
        assert select_hf_modules(model, [e.name]) == ({e.name: e.target}, [])


@pytest.mark.parametrize(
    "name, asked, target",
    [
        ("llava15", "language_model.model.layers.1", "blocks.1.hook_resid_post"),
        ("llava15", "vision_tower.vision_model.encoder.layers.1", "vision.blocks.1.hook_resid_post"),
        ("llava15", "language_model.model.layers.1.post_attention_layernorm", "blocks.1.ln2"),
        ("llava15", "multi_modal_projector", "projector.hook_out"),
        ("llava15", "language_model.lm_head", "unembed"),
        ("llava15", "model.language_model.norm", "ln_final"),
        ("qwen2_vl", "visual.blocks.1", "vision.blocks.1.hook_resid_post"),
        ("qwen2_vl", "model.layers.1.post_attention_layernorm", "blocks.1.ln2"),
        ("qwen2_vl", "lm_head", "unembed"),
        ("blip2_opt", "vision_model.post_layernorm", "vision.ln_post"),
        ("blip2_opt", "qformer.encoder.layer.1", "qformer.blocks.1.hook_normalized_resid_post"),
    ],
)
def test_vlm_lens_config_names(loaded, name, asked, target):
    """Names as VLM-Lens's configs and README write them resolve to the equivalent hook points / modules."""
    assert select_hf_modules(loaded(name).model, [asked]) == ({asked: target}, [])


def test_patterns_split_and_refuse(loaded):
    model = loaded("llava15").model
    chosen, rest = select_hf_modules(model, [r"language_model\.model\.layers\.\d+", "blocks.0.hook_resid_post"])
    assert chosen == {"language_model.model.layers.0": "blocks.0.hook_resid_post",
                      "language_model.model.layers.1": "blocks.1.hook_resid_post"}
    assert rest == ["blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match="matches HF module names .* and hook names"):
        select_hf_modules(model, [".*"])
