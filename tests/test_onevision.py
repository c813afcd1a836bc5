"""LLaVA-OneVision against HF (fp32, max abs diff <= 1e-4): a tiny checkpoint saved and loaded back.

HF's LlavaOnevisionProcessor cannot be built without torchvision (its video processor needs it), so the model
loads tl_vlm's image-and-text processor from the same files; its placeholder counts are checked here against
HF's own count (the processor's ``_get_number_of_features``) and against the features HF's model packs.
"""

from __future__ import annotations

import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from tl_vlm import HookedVLM
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.families.onevision_layout import anyres_layout, image_token_count, max_tiles, tiles_per_image
from tl_vlm.families.onevision_processor import OnevisionImageTextProcessor
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_onevision import (
    GRID_PINPOINTS,
    IMAGE_SIZE,
    PATCH_SIZE,
    VISION_ASPECT_RATIO,
    build_tiny_onevision,
    chat,
)

ATOL = 1e-4
GRID = IMAGE_SIZE // PATCH_SIZE
# (w, h): a 2x2 canvas (no downsampling) and a 3x4 canvas (anyres_max downsampling).
SIZES = [(50, 40), (100, 90)]
PROMPTS = [chat("<image>\nWhat is the colour?"), chat("<image>\nDescribe the shape in the image please.")]
# (h, w) sizes for the count checks: small, wide, tall, exact canvases, and large ones that downsample.
COUNT_SIZES = [(20, 20), (30, 30), (40, 50), (30, 90), (90, 30), (60, 60), (61, 59), (90, 100), (120, 120),
               (37, 113), (113, 37), (200, 150), (17, 400), (119, 91)]


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[mask] if mask is not None else diff).max().item()


def video_frames(n: int, seed: int = 5):
    return sample_images(n, seed=seed, sizes=[(40, 40)] * n)


class OneVision:
    def __init__(self, path):
        self.path = path
        self.hf = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HF's processor needs torchvision: tl_vlm's is used
            self.model = HookedVLM.from_pretrained(path)
        assert isinstance(self.model.processor, OnevisionImageTextProcessor)

    def batch(self, padding_side: str = "left"):
        return self.model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS, padding_side=padding_side)

    def multi_image(self):
        """One prompt with two images (not tiled), one with one image (tiled): batch_num_images [2, 1]."""
        a, b, c = sample_images(3, seed=3, sizes=[(40, 60), (50, 50), (70, 40)])
        texts = [chat("<image><image>\nWhich one is red?"), chat("<image>\nWhat is the colour?")]
        return self.model.prepare(images=[[a, b], [c]], text=texts)

    def video(self, with_image: bool = False):
        """A 3-frame video; ``with_image``: an image in the same prompt before it."""
        if with_image:
            text = chat("<image><video>\nWhat moves?")
            return self.model.processor(images=sample_images(1, seed=7, sizes=[(60, 40)]), videos=[video_frames(3)],
                                        text=text)
        return self.model.processor(videos=[video_frames(3)], text=chat("<video>\nWhat moves?"))


@pytest.fixture(scope="module")
def ov(tmp_path_factory) -> OneVision:
    torch.manual_seed(0)
    return OneVision(build_tiny_onevision(tmp_path_factory.mktemp("onevision") / "ov"))


def inputs_of(ov, which: str):
    from tl_vlm import VLMInputs

    if which == "batch":
        return ov.batch()
    if which == "multi_image":
        return ov.multi_image()
    return VLMInputs.from_mapping(ov.video(with_image=which == "video_and_image"))


# ---------------------------------------------------------------------------------------------- processor


def hf_count(ov, h: int, w: int) -> int:
    """HF's LlavaOnevisionProcessor._get_number_of_features, on a shim (the processor itself needs torchvision)."""
    processor = ov.model.processor
    shim = SimpleNamespace(
        image_processor=processor.image_processor, num_image_tokens=processor.num_image_tokens,
        vision_aspect_ratio=processor.vision_aspect_ratio,
    )
    shim._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, shim)
    return LlavaOnevisionProcessor._get_number_of_features(shim, h, w, IMAGE_SIZE, IMAGE_SIZE)


def hf_packed_count(ov, h: int, w: int) -> int:
    """Tokens HF's model packs for one tiled image of (h, w)."""
    config = ov.hf.config
    n = tiles_per_image(torch.tensor([[h, w]]), None, GRID_PINPOINTS, IMAGE_SIZE)[0]
    features = torch.zeros(n, GRID * GRID, 4)
    packed, _ = ov.hf.model.pack_image_features(
        [features], torch.tensor([[h, w]]), image_newline=torch.zeros(4), vision_aspect_ratio=config.vision_aspect_ratio
    )
    return packed[0].shape[0]


def test_image_token_counts_equal_hfs(ov):
    max_n = max_tiles(VISION_ASPECT_RATIO)
    downsampled = set()
    for h, w in COUNT_SIZES:
        ours = image_token_count((h, w), True, GRID_PINPOINTS, IMAGE_SIZE, GRID, max_n)
        assert ours == hf_count(ov, h, w) == hf_packed_count(ov, h, w), (h, w)
        downsampled.add(anyres_layout((h, w), GRID_PINPOINTS, IMAGE_SIZE, GRID, max_n).downsampled)
        assert image_token_count((h, w), False, GRID_PINPOINTS, IMAGE_SIZE, GRID, max_n) == GRID * GRID + 1
    assert downsampled == {True, False}, "the sizes must exercise both sides of the anyres_max branch"
    layouts = [anyres_layout((h, w), GRID_PINPOINTS, IMAGE_SIZE, GRID, max_n) for w, h in SIZES]
    assert [layout.downsampled for layout in layouts] == [False, True]


def test_processor_expands_placeholders_as_hf_counts(ov):
    batch = ov.batch()
    counts = (batch.input_ids == ov.model.vlm_cfg.image_token_id).sum(-1).tolist()
    assert counts == [hf_count(ov, h, w) for w, h in SIZES]
    multi = ov.multi_image()
    assert multi.batch_num_images.tolist() == [2, 1]
    counts = (multi.input_ids == ov.model.vlm_cfg.image_token_id).sum(-1).tolist()
    assert counts == [2 * (GRID * GRID + 1), hf_count(ov, 40, 70)]
    video = ov.video()
    assert tuple(video["pixel_values_videos"].shape) == (1, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    n_video = int((video["input_ids"] == ov.hf.config.video_token_id).sum())
    assert n_video == 3 * math.ceil(GRID / 2) ** 2 + 1
    with pytest.raises(ValueError, match="placeholder"):
        ov.model.processor(images=sample_images(1), text=chat("no image here"))


# ---------------------------------------------------------------------------------------------- spatial index


def bilinear(grid: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """``grid[y, x]`` sampled as F.interpolate(mode="bilinear", align_corners=False) does (patch k centred at k)."""
    def axis(v: float, n: int):
        v = max(v, 0.0)
        lo = min(int(v), n - 1)
        return lo, min(lo + 1, n - 1), v - lo

    y0, y1, wy = axis(y, grid.shape[0])
    x0, x1, wx = axis(x, grid.shape[1])
    top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
    bottom = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def expected_blend(row, projected: torch.Tensor, image_sizes, first_tiles) -> tuple[torch.Tensor, tuple[int, int]]:
    """What a pooled token should be, recomputed from its box: (bilinear sample of the patch grid under it, the
    (tile, patch) holding its centre)."""
    cx, cy = (row.x0 + row.x1) / 2, (row.y0 + row.y1) / 2
    if row.kind == "video":  # boxes in frame pixels; the frame's own grid
        grid = projected[row.tile].view(GRID, GRID, -1)
        y, x = cy / PATCH_SIZE, cx / PATCH_SIZE
        return bilinear(grid, y - 0.5, x - 0.5), (row.tile, int(y) * GRID + int(x))
    h, w = image_sizes[row.image]
    layout = anyres_layout((h, w), GRID_PINPOINTS, IMAGE_SIZE, GRID, max_tiles(VISION_ASPECT_RATIO))
    th, tw = layout.tiles_h, layout.tiles_w
    scale = min(tw * IMAGE_SIZE / w, th * IMAGE_SIZE / h)
    pad_x, pad_y = (tw * IMAGE_SIZE - w * scale) / 2, (th * IMAGE_SIZE - h * scale) / 2
    y, x = (cy * scale + pad_y) / PATCH_SIZE, (cx * scale + pad_x) / PATCH_SIZE  # canvas patch units
    first = first_tiles[row.image] + 1
    canvas = projected[first : first + th * tw].view(th, tw, GRID, GRID, -1).permute(0, 2, 1, 3, 4)
    canvas = canvas.reshape(th * GRID, tw * GRID, -1)
    unpadded = canvas[layout.top : layout.top + layout.height, layout.left : layout.left + layout.width]
    r, c = int(y + 1e-9), int(x + 1e-9)
    held = (first + (r // GRID) * tw + c // GRID, (r % GRID) * GRID + c % GRID)
    return bilinear(unpadded, y - layout.top - 0.5, x - layout.left - 0.5), held


@pytest.mark.parametrize("which", ["batch", "multi_image", "video_and_image"])
def test_spatial_index_points_at_the_feeding_patch(ov, which):
    model = ov.model
    inputs = inputs_of(ov, which)
    index = spatial_index(model, inputs)
    assert len(index) == int(model.image_token_mask(inputs.input_ids).sum())
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["hook_embed", "projector.hook_out"])
    projected, embed = cache["projector.hook_out"], cache["hook_embed"]
    newline = model.projector.image_newline
    sizes = inputs.image_sizes.tolist() if inputs.image_sizes is not None else []
    n_tiles = tiles_per_image(inputs.image_sizes, inputs.batch_num_images, GRID_PINPOINTS, IMAGE_SIZE) if sizes else []
    first_tiles = [sum(n_tiles[:i]) for i in range(len(n_tiles))]
    for row in index.itertuples():
        token = embed[row.batch, row.position]
        if row.kind == "newline":
            assert torch.equal(token, newline), row
        elif row.kind == "patch":
            assert torch.equal(token, projected[row.tile, row.patch]), row
        else:  # a bilinear blend of the patches around the centre of its box
            assert row.kind in ("pooled", "video"), row
            blend, held = expected_blend(row, projected, sizes, first_tiles)
            assert max_diff(token, blend) <= 1e-5, row
            assert held == (row.tile, row.patch) and row.patch == row.row * GRID + row.col, row
    boxes = index[index["kind"] != "newline"]
    if which == "batch":
        for image, (w, h) in enumerate(SIZES):
            mine = boxes[boxes["image"] == image]
            assert mine["x0"].min() >= -1e-6 and mine["x1"].max() <= w + 1e-6, image
            assert mine["y0"].min() >= -1e-6 and mine["y1"].max() <= h + 1e-6, image
            assert mine["tile"].nunique() == n_tiles[image]
        assert (boxes["kind"] == "pooled").any() and (boxes["kind"] == "patch").any()
    if which == "video_and_image":
        video = index[index["kind"] == "video"]
        assert sorted(video["t"].unique().tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused(ov):
    model, batch = ov.model, ov.batch()
    image_id = model.vlm_cfg.image_token_id
    ids = batch.input_ids.clone()
    first = (ids[0] == image_id).nonzero()[0, 0]
    ids[0, first] = model.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="feature vectors"):
        model({**batch.as_kwargs(), "input_ids": ids})
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch.input_ids, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="no image placeholder"):
        model(model.to_tokens("hello"), pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="batch_num_images"):
        model({**batch.as_kwargs(), "batch_num_images": torch.tensor([1, 1, 1])})
    video = inputs_of(ov, "video")
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        model(video.input_ids)
    with pytest.raises(ValueError, match="video placeholder"):
        model({**batch.as_kwargs(), "pixel_values_videos": video.pixel_values_videos})
    short = video.pixel_values_videos[:, :2]  # two frames for a three-frame prompt
    with pytest.raises(ValueError, match="video"):
        model(video.input_ids, pixel_values_videos=short)


def test_real_config_converts():
    """The flagship config's shape (HF's defaults: SigLIP-so400m, anyres_max_9) maps onto tl_vlm's configs."""
    from transformers import LlavaOnevisionConfig

    from tl_vlm.families import family_for

    config = LlavaOnevisionConfig()
    family = family_for(config)
    cfg = family.config_from_hf(config)
    assert family.family == "llava_onevision" and cfg.max_tiles == 9
    assert cfg.vision.n_ctx == 27 * 27 and cfg.vision.original_architecture == "SiglipVisionModel"
    assert max_tiles(config.vision_aspect_ratio) == 9
