"""Qwen2-VL / Qwen2.5-VL-only behaviour (the shared contract, video and two-image cases included, is
tests/conformance): derived mm_token_type_ids, image features, attention kept within frames and windows,
padded vision rows, the spatial index over merged patches, and image_grid_thw errors."""

from __future__ import annotations

import pytest
import torch
from conformance.registry import params

from tl_vlm import VLMInputs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.zoo.tiny_qwen_vl import VARIANTS


class Qwen:
    """The registry entry, with the names the tests below were written with."""

    def __init__(self, loaded):
        self.variant, self.hf, self.model = loaded.name, loaded.hf, loaded.model
        self.tok = loaded.model.tokenizer
        self._cases = loaded.cases

    def case(self, name: str) -> VLMInputs:
        return {"padded_batch": self._cases["batch"]}.get(name) or self._cases[name]


@pytest.fixture(params=[p for p in params() if p.values[0] in VARIANTS])
def qwen(request, loaded) -> Qwen:
    return Qwen(loaded(request.param))


def test_image_features_are_the_embeddings_at_the_placeholders(qwen):
    inputs = qwen.case("two_images")
    with torch.no_grad():
        _, cache = qwen.model.run_with_cache(inputs, names_filter="hook_image_embed")
        features = qwen.model.image_features(inputs)
    assert torch.equal(features, cache["hook_image_embed"][qwen.model.image_token_mask(inputs.input_ids)])


def test_mm_token_type_ids_are_derived_when_missing(qwen):
    inputs = qwen.case("video")
    with torch.no_grad():
        expected = qwen.model(inputs)
        inputs.mm_token_type_ids = None
        assert torch.equal(qwen.model(inputs), expected)


def test_attention_stays_within_frames_and_windows(qwen):
    inputs = qwen.case("video")
    with torch.no_grad():
        _, cache = qwen.model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    layout = qwen.model.vision.patch_layout(torch.cat([inputs.image_grid_thw, inputs.video_grid_thw]))
    assert layout.frame[1].max() == 1, "the video row holds two temporal patches"
    full = qwen.model.vision.geometry.full_attention_blocks
    for i in range(qwen.model.vision.cfg.n_layers):
        segment = layout.frame if layout.window is None or i in full else layout.window
        outside = segment[:, None, :, None] != segment[:, None, None, :]
        pattern = cache[f"vision.blocks.{i}.attn.hook_pattern"]
        assert pattern.shape[:2] == (2, qwen.model.vision.cfg.n_heads)
        assert torch.all(pattern.masked_select(outside) == 0), f"block {i} attends across frames / windows"
    if layout.window is not None:
        assert len(layout.window[0].unique()) > 2, "the tiny images span several windows"


def test_vision_rows_are_padded_to_the_longest_image(qwen):
    model, inputs = qwen.model, qwen.case("two_images")
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(inputs)
    finally:
        model.set_use_attn_result(False)
    vcfg, longest = model.vision.cfg, 60  # 6x10 and 8x6 patch grids, padded to 60
    assert cache["vision.hook_embed"].shape == (2, longest, vcfg.d_model)
    assert cache["vision.blocks.0.attn.hook_q"].shape == (2, longest, vcfg.n_heads, vcfg.d_head)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (2, vcfg.n_heads, longest, longest)
    assert cache["vision.blocks.0.attn.hook_result"].shape == (2, longest, vcfg.n_heads, vcfg.d_model)
    assert cache["projector.hook_out"].shape == (2, longest // 4, model.cfg.d_model)
    pattern = cache["vision.blocks.0.attn.hook_pattern"][1]
    assert torch.all(pattern[:, :48, 48:] == 0), "real patches never attend to padding"


def test_spatial_index_maps_tokens_to_grid_cells_and_pixels(qwen):
    model, inputs = qwen.model, qwen.case("video")
    index = spatial_index(model, inputs)
    assert len(index) == int(model.image_token_mask(inputs.input_ids).sum())
    assert list(index["kind"].unique()) == ["video", "patch"], "video placeholders come first in this prompt"
    image = index[index["kind"] == "patch"]
    assert (image["tile"] == 0).all() and (index[index["kind"] == "video"]["tile"] == 1).all()
    # Image 0 (40x24 px, kept at that size) has a 3x5 grid of merged tokens, 8x8 px each.
    token = image.iloc[7]
    assert (token["t"], token["row"], token["col"]) == (0, 1, 2)
    assert (token["x0"], token["y0"], token["x1"], token["y1"]) == (16, 8, 24, 16)
    video = index[index["kind"] == "video"]
    assert video["t"].tolist() == [0] * 6 + [1] * 6
    # The cell of a token is where the vision tower's rotary puts the patches it merges.
    layout = model.vision.patch_layout(torch.cat([inputs.image_grid_thw, inputs.video_grid_thw]))
    for _, cell in index.iterrows():
        row, col = layout.positions[cell["tile"], cell["patch"]].tolist()
        assert (row, col) == (2 * cell["row"], 2 * cell["col"])
    # Boxes in the original images: 80x48 -> 40x24 halves both axes, 48x96 -> 24x32 (w, h) scales by 2 and 3.
    original = model.image_token_cells(qwen.case("two_images"), [(80, 48), (48, 96)])
    assert (original[7]["x0"], original[7]["y1"]) == (32, 32) and (original[15]["x1"], original[15]["y1"]) == (16, 24)


def test_image_grid_errors(qwen):
    model, inputs = qwen.model, qwen.case("two_images")
    grid = inputs.image_grid_thw
    cases = {
        "implies 92 patches": dict(image_grid_thw=torch.tensor([[1, 6, 10], [1, 8, 4]])),
        "runs of \\[15, 12\\] tokens but image_grid_thw gives \\[12, 15\\]": dict(image_grid_thw=grid.flip(0)),
        "needs image_grid_thw": dict(image_grid_thw=None),
    }
    for message, change in cases.items():
        broken = VLMInputs(**{**inputs.as_kwargs(), **change})
        with pytest.raises(ValueError, match=message):
            model(broken)
    image_id = model.vlm_cfg.image_token_id
    first = int((inputs.input_ids[0] == image_id).nonzero()[0])
    dropped = torch.cat([inputs.input_ids[:, :first], inputs.input_ids[:, first + 1 :]], dim=1)
    with pytest.raises(ValueError, match="runs of \\[14, 12\\] tokens"):
        model(input_ids=dropped, pixel_values=inputs.pixel_values, image_grid_thw=grid)
