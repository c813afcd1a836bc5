"""Idefics3 / SmolVLM beyond the conformance contract (registry entries ``idefics3``, ``smolvlm``): bucketed
positions against HF's embeddings, padded and masked sub-images against HF, the SmolVLM processor against HF's,
the spatial index, rows keeping their sub-images, and bad input.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from unittest import mock

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    ProcessorMixin,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)

from tl_vlm import HookedVLM
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.towers.patch_mask_vit import bucketed_position_ids
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_idefics3 import build_idefics3_tokenizer, build_tiny_idefics3, chat, geometry

ATOL = 1e-4
PROMPTS = [chat("<image>What is the colour?"), chat("Describe <image> the shape please.")]
SIZES = [(60, 30), (20, 20)]  # (w, h): 2x1 sub-images + global, 2x2 + global


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def max_diff(a, b, mask=None) -> float:
    diff = (a.float() - b.float()).abs()
    return (diff[mask] if mask is not None else diff).max().item()


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def pair(request, tmp_path_factory):
    path = build_tiny_idefics3(tmp_path_factory.mktemp("idefics3") / request.param, request.param)
    model = quiet(HookedVLM.from_pretrained, path)
    return request.param, path, AutoModelForImageTextToText.from_pretrained(path).eval(), model


def batch(model):
    return model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS)


def test_bucketed_positions_are_hfs(pair):
    """Real extents of every size in a padded canvas: the positions HF's embeddings add (patch conv zeroed)."""
    _, _, hf, model = pair
    embeddings = hf.model.vision_model.embeddings
    side = embeddings.num_patches_per_side
    masks = torch.zeros(side * side, side, side, dtype=torch.bool)
    for k, (h, w) in enumerate((h, w) for h in range(1, side + 1) for w in range(1, side + 1)):
        masks[k, :h, :w] = True
    pixels = torch.zeros(len(masks), 3, side * embeddings.patch_size, side * embeddings.patch_size)
    with torch.no_grad(), mock.patch.object(embeddings.patch_embedding, "forward", lambda x: torch.zeros(x.shape[0], embeddings.embed_dim, side, side)):
        theirs = embeddings(pixels, masks)
    ours = model.vision.embed.W_pos[bucketed_position_ids(masks, side)]
    assert torch.equal(ours, theirs)


def test_padded_and_masked_sub_images_match_hf(pair):
    """A sub-image padded bottom-right as HF's ``pad`` pads a smaller image (zero pixels, mask 0; this PIL
    processor resizes every sub-image to the full canvas, so the padding is made here), and a masked pixel region
    whose pixels stay: both read as padding, as HF."""
    name, _, hf, model = pair
    size = geometry(name)[0]
    inputs = batch(model)
    pixels, mask = inputs.pixel_values.clone(), inputs.pixel_attention_mask.clone()
    pixels[1, 1, :, size - 8 :, :], mask[1, 1, size - 8 :, :] = 0, 0  # padded to (size - 8) x size
    pixels[1, 1, :, :, size // 2 :], mask[1, 1, :, size // 2 :] = 0, 0
    mask[0, 0, size // 2 :, : size // 3] = 0  # masked, pixels kept
    padded = dataclasses.replace(inputs, pixel_values=pixels, pixel_attention_mask=mask)
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        assert max_diff(model(padded), hf(**padded.as_kwargs()).logits, real) <= ATOL
        assert max_diff(model(padded), model(inputs), real) > 1e-3, "padding and the masked region are not read"
    index = spatial_index(model, padded)
    assert (index["kind"] == "padding").any() and (index["kind"] == "patch").any()


def test_smolvlm_processor_gives_hfs_tokens(pair):
    name, path, _, model = pair
    if name != "smolvlm":
        pytest.skip("Idefics3's own processor loads (no torchvision needed)")
    # Without its video processor (torchvision) and num2words (used for video frame timestamps only).
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None), \
            mock.patch("transformers.models.smolvlm.processing_smolvlm.num2words", str):
        hf = SmolVLMProcessor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                              video_processor=None, image_seq_len=model.vlm_cfg.image_seq_len)
    for sizes in ([(60, 30), (20, 20)], [(100, 20), (33, 71)]):
        images = [[image] for image in sample_images(2, seed=2, sizes=sizes)]  # SmolVLM's takes them per prompt
        ours = model.prepare(images=images, text=PROMPTS)
        theirs = hf(images=images, text=PROMPTS, return_tensors="pt", padding=True)
        assert torch.equal(ours.input_ids, theirs["input_ids"]) and torch.equal(ours.pixel_values, theirs["pixel_values"])
        assert torch.equal(ours.pixel_attention_mask, theirs["pixel_attention_mask"])


def test_spatial_index_covers_each_image_per_crop_kind(pair):
    _, _, _, model = pair
    images = sample_images(2, seed=1, sizes=SIZES)
    inputs = batch(model)
    index = spatial_index(model, inputs, images)
    assert len(index) == int(model.image_token_mask(inputs.input_ids).sum())
    assert all(len(p) == model.capabilities.patches_per_token for p in index["patches"])
    for image, (w, h) in enumerate(SIZES):
        cells = index[index["image"] == image]
        is_global = cells["crop"] == "global"
        for part in (cells[is_global], cells[~is_global]):
            assert part["x0"].min() == pytest.approx(0) and part["x1"].max() == pytest.approx(w)
            assert part["y0"].min() == pytest.approx(0) and part["y1"].max() == pytest.approx(h)
            assert ((part["x1"] - part["x0"]) * (part["y1"] - part["y0"])).sum() == pytest.approx(w * h)
    grids = {image: sorted(set(index[(index["image"] == image) & (index["crop"] != "global")]["crop"])) for image in (0, 1)}
    assert grids == {0: [(1, 1), (1, 2)], 1: [(1, 1), (1, 2), (2, 1), (2, 2)]}


def test_rows_keep_their_sub_images(pair):
    _, _, _, model = pair
    inputs = batch(model)
    with torch.no_grad():
        full, second = model(inputs), model(inputs[1:])
    assert max_diff(second[0], full[1], inputs.attention_mask[1].bool()) <= ATOL


def test_bad_sub_images_are_clear_errors(pair):
    _, _, _, model = pair
    inputs = batch(model)
    kwargs = inputs.as_kwargs()
    pixels, mask = kwargs["pixel_values"].clone(), kwargs["pixel_attention_mask"].clone()
    with pytest.raises(ValueError, match="pixel_attention_mask has shape .* needs"):
        model({**kwargs, "pixel_attention_mask": mask[..., :-4]})
    with pytest.raises(ValueError, match="pixel_attention_mask has shape .* needs"):
        model({**kwargs, "pixel_attention_mask": mask[:, :1]})
    empty = mask.clone()
    empty[1, 2] = 0  # a real sub-image with no real pixel
    with pytest.raises(ValueError, match=r"sub-images \[5\] .* all padding"):
        model({**kwargs, "pixel_attention_mask": empty})
    dropped = pixels.clone()
    dropped[1, 4] = 0  # the global image zeroed: HF reads it as a padding slot, its 9 tokens have no features
    with pytest.raises(ValueError, match="7 real sub-images .* <image> tokens"):
        model({**kwargs, "pixel_values": dropped})
    with pytest.raises(ValueError, match=r"\[prompt, sub-image, channel, height, width\]"):
        model({**kwargs, "pixel_values": pixels.flatten(0, 1)})


@pytest.mark.parametrize("seed", range(4))
def test_random_configs_match_hf(seed):
    """Random small Idefics3 / SmolVLM models (shuffle scale, grid, widths, activation, GQA, tying) on random
    sub-images with padding slots and partly padded pixel masks, against HF."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = build_idefics3_tokenizer()
    scale, patch = rng.choice([2, 3, 4]), rng.choice([2, 4])
    side = scale * rng.choice([1, 2])
    heads = rng.choice([2, 4])
    smol = rng.random() < 0.5
    vision = dict(hidden_size=8 * heads, intermediate_size=40, num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads,
                  image_size=side * patch, patch_size=patch, hidden_act=rng.choice(["gelu_pytorch_tanh", "gelu"]),
                  layer_norm_eps=rng.choice([1e-6, 1e-5]), initializer_range=0.1)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=rng.choice([1, 2, 4]), tie_word_embeddings=smol, initializer_range=0.1,
                       pad_token_id=tok.pad_token_id)
    common = dict(text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, tie_word_embeddings=smol)
    hf = (SmolVLMForConditionalGeneration(SmolVLMConfig(vision_config=SmolVLMVisionConfig(**vision), **common)) if smol
          else Idefics3ForConditionalGeneration(Idefics3Config(vision_config=Idefics3VisionConfig(**vision), **common))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = quiet(HookedVLM.from_hf_model, hf)
    per = side * side // scale**2
    counts = [rng.choice([1, 3]), 2]  # real sub-images per prompt; the rest of the slots are padding
    ids = [tok(chat("".join("<fake_token_around_image><global-img>" + "<image>" * per for _ in range(n)) + "colour?"))["input_ids"]
           for n in counts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in ids])[:, None]).long()
    size = side * patch
    pixels = torch.zeros(2, max(counts), 3, size, size)
    pixel_mask = torch.zeros(2, max(counts), size, size, dtype=torch.long)
    for row, n in enumerate(counts):
        for k in range(n):
            h, w = rng.randint(1, size), rng.randint(1, size)  # the real extent, top-left
            pixels[row, k, :, :h, :w] = torch.randn(3, h, w)
            pixel_mask[row, k, :h, :w] = 1
    inputs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    with torch.no_grad():
        assert max_diff(model(**inputs), hf(**inputs).logits, mask.bool()) <= ATOL
