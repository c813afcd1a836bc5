"""The HF internals tl_vlm calls through stand-ins (tl_vlm/hf_compat.py) equal HF's own model methods.

If a transformers release changes one of these private methods, this file is where it shows, by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tl_vlm.hf_compat import llava_next_pack, llava_onevision_pack, qwen_rope_index
from tl_vlm.zoo.tiny import build_tiny_vlm
from tl_vlm.zoo.tiny_onevision import build_tiny_onevision
from tl_vlm.zoo.tiny_qwen_vl import build_tiny_qwen_vl

SIZES = torch.tensor([[30, 60], [90, 30], [100, 90]])  # (height, width): wide, tall, large (downsampled)


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval()


def _tile_features(hf, sizes, tiles_of) -> list[torch.Tensor]:
    cfg = hf.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    torch.manual_seed(0)
    return [torch.randn(tiles_of(size), grid * grid, cfg.text_config.hidden_size) for size in sizes.tolist()]


def test_llava_next_pack_is_hfs(tmp_path):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    hf = _load(build_tiny_vlm(tmp_path / "next", "llava_next_mistral"))
    cfg = hf.config
    sizes = SIZES[:2]
    tiles = lambda size: image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)  # noqa: E731
    features = _tile_features(hf, sizes, tiles)  # "default": the class token is already dropped
    expected, _ = hf.model.pack_image_features(features, sizes, "default", image_newline=hf.model.image_newline)
    got = llava_next_pack(cfg, features, sizes, "default", hf.model.image_newline)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_llava_onevision_pack_is_hfs(tmp_path):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    hf = _load(build_tiny_onevision(tmp_path / "ov"))
    cfg = hf.config
    tiles = lambda size: image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)  # noqa: E731
    features = _tile_features(hf, SIZES, tiles)
    expected, _ = hf.model.pack_image_features(
        features, SIZES, image_newline=hf.model.image_newline, vision_aspect_ratio=cfg.vision_aspect_ratio
    )
    got = llava_onevision_pack(cfg, features, SIZES, hf.model.image_newline)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_rope_index_is_hfs(tmp_path, variant):
    hf = _load(build_tiny_qwen_vl(tmp_path / variant, variant))
    cfg = hf.config
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])  # an image, then a two-frame video
    image, video = cfg.image_token_id, cfg.video_token_id
    ids = torch.tensor([[5, 6] + [image] * 6 + [7] + [video] * 8 + [8, 9]])
    ids = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, :-2]], 1), ids])  # left-padded row too
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[2], [0]])).long()
    types = (ids == image).int() + 2 * (ids == video).int()
    kwargs = dict(mm_token_type_ids=types, image_grid_thw=grid[:1].repeat(2, 1), video_grid_thw=grid[1:].repeat(2, 1),
                  attention_mask=mask)
    if variant == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([1.0, 1.0])
    expected, _ = hf.model.get_rope_index(ids, **kwargs)
    assert torch.equal(qwen_rope_index(type(hf.model), cfg, ids, **kwargs), expected)
