"""Bad input to Llama 3.2 Vision gets a clear error, never a silent wrong answer: tile masks that disagree with the
aspect-ratio ids, image tokens without images (or images without tokens), image counts that disagree with the
tokens, missing or misshapen tile / cross-attention inputs, and images on a decode step whose cache holds them."""

from __future__ import annotations

import dataclasses

import pytest
import torch


@pytest.fixture(scope="module")
def batch(loaded):
    return loaded("mllama").batch()


@pytest.fixture(scope="module")
def model(loaded):
    return loaded("mllama").model


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(dataclasses.replace(inputs, **changes))


def test_tile_mask_inconsistent_with_aspect_ratio_ids(model, batch):
    tiles = batch.aspect_ratio_mask.clone()
    tiles[0, 0, 2] = 1  # row 0's 1x2 image marked with a third tile
    with pytest.raises(ValueError, match=r"aspect_ratio_mask of row 0, image 0 is \[1, 1, 1, 0\] but its aspect_ratio_id 2 means 2 tile"):
        run(model, batch, aspect_ratio_mask=tiles)
    ids = batch.aspect_ratio_ids.clone()
    ids[1, 0] = 1  # a 1x1 id for the 3-tile image
    with pytest.raises(ValueError, match="means 1 tile"):
        run(model, batch, aspect_ratio_ids=ids)
    ids[1, 0] = 99
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must lie in \[0, 8\]"):
        run(model, batch, aspect_ratio_ids=ids)


def test_image_token_without_an_image(model, batch):
    with pytest.raises(ValueError, match=r"2 <\|image\|> tokens but no pixel_values"):
        run(model, batch, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None)
    empty = torch.zeros_like(batch.aspect_ratio_ids)  # pixels whose slots all say "no image"
    tiles = torch.zeros_like(batch.aspect_ratio_mask)
    tiles[..., 0] = 1
    with pytest.raises(ValueError, match=r"row 0 of input_ids holds 1 <\|image\|> tokens but 0 images"):
        run(model, batch, aspect_ratio_ids=empty, aspect_ratio_mask=tiles, cross_attention_mask=torch.zeros_like(batch.cross_attention_mask))


def test_image_count_mismatch(model, loaded):
    two = loaded("mllama").cases["multi_image"]  # row 0 holds two images and two tokens
    ids = two.input_ids.clone()
    ids[0, (ids[0] == model.vlm_cfg.image_token_id).nonzero()[1, 0]] = int(ids[0, -1])
    with pytest.raises(ValueError, match=r"row 0 of input_ids holds 1 <\|image\|> tokens but 2 images"):
        run(model, two, input_ids=ids)


def test_image_inputs_must_come_together(model, batch):
    for name in ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        with pytest.raises(ValueError, match=f"pixel_values need \\['{name}'\\] too"):
            run(model, batch, **{name: None})
    with pytest.raises(ValueError, match="without pixel_values; refusing to drop"):
        run(model, batch, input_ids=torch.where(batch.input_ids == model.vlm_cfg.image_token_id, 1, batch.input_ids),
            pixel_values=None)


def test_misshapen_pixels_and_masks(model, batch):
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, image, tile, channel, height, width\]"):
        run(model, batch, pixel_values=batch.pixel_values[:, :, :3])
    with pytest.raises(ValueError, match="cross_attention_mask has shape"):
        run(model, batch, cross_attention_mask=batch.cross_attention_mask[:, :-1])
    with pytest.raises(ValueError, match=r"aspect_ratio_ids \(2, 2\)"):
        run(model, batch, aspect_ratio_ids=batch.aspect_ratio_ids.repeat(1, 2))
    seen = batch.cross_attention_mask.clone()
    seen[0, -1, 0, 3] = 1  # a token sees a padding tile
    with pytest.raises(ValueError, match="tiles that aspect_ratio_mask marks as padding"):
        run(model, batch, cross_attention_mask=seen)


def test_images_again_on_a_cached_decode_step(model, batch):
    cache = model.new_kv_cache(2, batch.shape[1] + 2, batch.device, torch.float32)
    with torch.no_grad():
        model(batch, cache=cache)
        step = dataclasses.replace(batch, input_ids=batch.input_ids[:, -1:],
                                   attention_mask=torch.ones(2, batch.shape[1] + 1, dtype=torch.long),
                                   cross_attention_mask=None, aspect_ratio_ids=None, aspect_ratio_mask=None)
        with pytest.raises(ValueError, match="the KV cache already holds the prompt's images"):
            model(step, cache=cache)
