"""The spatial index maps every image token to the vision patch that feeds it and to its pixels."""

from __future__ import annotations

import torch

from conftest import PROMPTS
from tl_vlm.analysis.spatial import box_from_fraction, patch_image_region, region_mask, spatial_index
from tl_vlm.zoo.data import sample_images


def sizes_for(pair):
    return [(60, 30)] if pair.variant == "llava_next_mistral" else [(40, 60)]


def test_index_points_at_the_feeding_vision_patch(pair):
    model = pair.model
    images = sample_images(1, seed=2, sizes=sizes_for(pair))
    inputs = model.prepare(images=images, text=PROMPTS[0])
    index = spatial_index(model, inputs, images)
    assert len(index) == int(model.image_token_mask(inputs.input_ids).sum())
    _, cache = model.run_with_cache(inputs, names_filter=["hook_embed", "projector.hook_out"])
    offset = 1 if model.vlm_cfg.vision_feature_select_strategy == "default" else 0
    for row in index[index["kind"] != "newline"].itertuples():
        feature = cache["projector.hook_out"][row.tile, row.patch - offset]
        assert torch.equal(cache["hook_embed"][row.batch, row.position], feature), row
    patches = index[index["kind"] == "patch"]
    w, h = images[0].size
    assert patches["x0"].min() >= -1e-6 and patches["x1"].max() <= w + 1e-6
    assert patches["y0"].min() >= -1e-6 and patches["y1"].max() <= h + 1e-6


def test_region_patching(llava15):
    model = llava15.model
    a, b = sample_images(2, seed=4)
    source = model.prepare(images=a, text=PROMPTS[0])
    target = model.prepare(images=b, text=PROMPTS[0])
    index = spatial_index(model, target, [b])
    quarter = region_mask(index, target.input_ids, 0, box_from_fraction(b.size, (0, 0, 0.5, 0.5)))
    rows = index[(index["row"] < 3) & (index["col"] < 3)]  # 5x5 grid: cells starting in the top-left half
    assert quarter.sum() == len(rows)
    with torch.no_grad():
        patched = patch_image_region(model, target, source, quarter)
        everything = patch_image_region(model, target, source, model.image_token_mask(target.input_ids))
        assert torch.allclose(everything, model(source), atol=1e-5), "pasting every image token gives image A's run"
        assert not torch.allclose(patched, model(target)) and not torch.allclose(patched, model(source))
