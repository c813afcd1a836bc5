"""InternVL beyond the conformance contract (registry entry ``internvl3``): the pixel shuffle against HF's two
implementations, InternViT-6B's flags (RMSNorm, whole-width QK-norm, final LayerNorm) with a Qwen3 LM, random
small configurations, layer scale as TL weights, the processor against HF's, the tile / spatial index, bad input.
"""

from __future__ import annotations

import random
import warnings
from unittest import mock

import pytest
import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    ProcessorMixin,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.internvl.modeling_internvl import InternVLModel

from tl_vlm import HookedVLM
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.towers.pixel_shuffle import pixel_shuffle, token_patches
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_internvl import (
    IMAGE_SEQ_LENGTH,
    IMAGE_SIZE,
    PATCH_SIZE,
    build_internvl_tokenizer,
    build_tiny_internvl,
    chat,
)

ATOL = 1e-4
GRID = IMAGE_SIZE // PATCH_SIZE
PROMPTS = [chat("<IMG_CONTEXT>\nWhat is the colour?"), chat("Describe <IMG_CONTEXT>\n the shape please.")]
SIZES = [(60, 30), (50, 50)]  # (w, h): 2x1 crops + thumbnail, 2x2 crops + thumbnail


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def max_diff(a, b, mask=None) -> float:
    diff = (a.float() - b.float()).abs()
    return (diff[mask] if mask is not None else diff).max().item()


@pytest.fixture(scope="module")
def six_b(tmp_path_factory):
    path = build_tiny_internvl(tmp_path_factory.mktemp("internvl") / "six_b", "internvl_6b_qwen3")
    return path, InternVLForConditionalGeneration.from_pretrained(path).eval(), quiet(HookedVLM.from_pretrained, path)


# ------------------------------------------------------------------------------------------ pixel shuffle


@pytest.mark.parametrize("grid, scale", [(4, 2), (6, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_is_hfs_internvl_and_idefics3(grid, scale):
    """InternVL (ratio 1/scale, on [row, h, w, d]) and Idefics3 (factor scale, on [row, patch, d]) write the same
    permutation; ours is both, bit for bit, and token_patches names the patches each token holds."""
    x = torch.randn(3, grid * grid, 5)
    ours = pixel_shuffle(x, scale)
    assert torch.equal(ours, Idefics3Connector.pixel_shuffle(None, x, scale))
    if scale != 3:  # HF's InternVL checks divisibility by the float ratio, which 1/3 fails
        internvl = InternVLModel.pixel_shuffle(None, x.reshape(3, grid, grid, 5), 1 / scale)
        assert torch.equal(ours, internvl.reshape(3, -1, 5 * scale**2))
    index = torch.arange(grid * grid, dtype=torch.float32).reshape(1, -1, 1)
    held = pixel_shuffle(index, scale)[0].long().tolist()
    assert held == [[r * grid + c for r, c in patches] for patches in token_patches(grid, scale)]


def test_pixel_shuffle_refuses_a_grid_it_cannot_divide():
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_shuffle(torch.randn(1, 25, 4), 2)
    with pytest.raises(ValueError, match="square patch grid"):
        pixel_shuffle(torch.randn(1, 24, 4), 2)


# ------------------------------------------------------------------------ InternViT-6B flags with Qwen3


def test_internvit_6b_and_qwen3_match_hf(six_b):
    path, hf, model = six_b
    vision = model.vision.blocks[0].attn
    assert type(vision.q_norm).__name__ == "WidthRMSNorm" and vision.q_norm.w.shape == (model.vision.cfg.d_model,)
    assert model.blocks[0].attn.q_norm.w.shape == (model.cfg.d_head,), "Qwen3's QK-norm is per head"
    inputs = model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS)
    outputs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in hf.model.vision_tower.encoder.layer]
    with torch.no_grad():
        reference = hf(**inputs.as_kwargs(), output_hidden_states=True)
        logits, cache = model.run_with_cache(inputs)
    for handle in handles:
        handle.remove()
    real = inputs.attention_mask.bool()
    assert max_diff(logits, reference.logits, real) <= ATOL
    for i in range(model.cfg.n_layers - 1):
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], reference.hidden_states[i + 1], real) <= ATOL
    for i, out in enumerate(outputs):
        assert max_diff(cache[f"vision.blocks.{i}.hook_resid_post"], out) <= ATOL
    tiles, pos = cache["vision.blocks.0.hook_resid_pre"].shape[:2]
    assert cache["vision.blocks.0.attn.q_norm.hook_scale"].shape == (tiles, pos, 1)
    assert cache["vision.blocks.0.attn.q_norm.hook_normalized"].shape == (tiles, pos, model.vision.cfg.d_model)
    assert "vision.ln_post.hook_normalized" in cache, "use_mean_pooling=False: the last state is normalised"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_internvit_6b_half_precision_is_hfs(six_b, dtype):
    path = six_b[0]
    hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    model = quiet(HookedVLM.from_pretrained, path, dtype=dtype)
    inputs = model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS)
    with torch.no_grad():
        reference = hf(**inputs.as_kwargs()).logits
        cached, _ = model.run_with_cache(inputs)
        assert max_diff(model(inputs), reference, inputs.attention_mask.bool()) == 0
    assert max_diff(cached, reference, inputs.attention_mask.bool()) == 0


def random_config(rng: random.Random) -> InternVLConfig:
    """A random small InternVL: norm type, QK-norm, biases, pooling, feature layer, shuffle scale, LM kind."""
    tok = build_internvl_tokenizer()
    scale = rng.choice([2, 2, 4])  # HF's InternVL takes ratios 1/2 and 1/4 (it checks divisibility by the float)
    grid = scale * rng.choice([1, 2, 3])
    patch = rng.choice([2, 4])
    heads = rng.choice([2, 4])
    vision = InternVLVisionConfig(
        hidden_size=8 * heads, intermediate_size=48, num_hidden_layers=rng.choice([1, 2, 3]), num_attention_heads=heads,
        image_size=grid * patch, patch_size=patch, hidden_act=rng.choice(["gelu", "quick_gelu"]),
        norm_type=rng.choice(["layer_norm", "rms_norm"]), layer_norm_eps=rng.choice([1e-6, 1e-5]),
        attention_bias=rng.random() < 0.5, use_qk_norm=rng.random() < 0.5, layer_scale_init_value=0.1,
        use_mean_pooling=rng.random() < 0.5, initializer_range=0.1,
    )
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=rng.choice([1, 2, 4]), max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=rng.random() < 0.5, initializer_range=0.1, pad_token_id=tok.pad_token_id)
    text = Qwen3Config(**common, head_dim=8) if rng.random() < 0.5 else Qwen2Config(**common)
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=1 / scale, projector_hidden_act=rng.choice(["gelu", "silu"]),
        vision_feature_layer=rng.choice([-1, -2, 1])  # HF 5.24 fails on 0 (it asks for no hidden states), tie_word_embeddings=text.tie_word_embeddings,
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_configs_match_hf(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = random_config(rng)
    hf = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1 or p.shape[:2] == (1, 1):
                p.add_(torch.randn_like(p) * 0.1)
    model = quiet(HookedVLM.from_hf_model, hf)
    vc, tok = config.vision_config, build_internvl_tokenizer()
    per_tile = (vc.image_size[0] // vc.patch_size[0] * config.downsample_ratio) ** 2
    n_tiles = [rng.choice([1, 3]), 2]
    ids = []
    for n in n_tiles:
        ids.append(tok(chat("<img>" + "<IMG_CONTEXT>" * int(per_tile * n) + "</img>\nWhat colour?"))["input_ids"])
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in ids])[:, None]).long()
    pixels = torch.randn(sum(n_tiles), 3, *vc.image_size)
    with torch.no_grad():
        reference = hf(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).logits
        ours = model(input_ids=input_ids, pixel_values=pixels, attention_mask=mask)
    assert max_diff(ours, reference, mask.bool()) <= ATOL


# ---------------------------------------------------------------------------------- layer scale as TL weights


def test_layer_scale_is_in_the_tl_weights(six_b):
    """W_O / W_out are what writes into the stream (HF's weight times lambda); the forward uses HF's own."""
    hf = six_b[1]
    model = quiet(HookedVLM.from_hf_model, hf)
    layer = hf.model.vision_tower.encoder.layer[0]
    block = model.vision.blocks[0]
    assert block.attn.W_O_unscaled.untyped_storage().data_ptr() == layer.attention.projection_layer.weight.untyped_storage().data_ptr()
    scaled = (layer.attention.projection_layer.weight * layer.lambda_1[:, None]).T.reshape(block.attn.W_O.shape)
    assert torch.allclose(block.attn.W_O, scaled)
    assert torch.allclose(block.mlp.W_out, layer.mlp.fc2.weight.T * layer.lambda_2)
    assert torch.allclose(block.mlp.b_out, layer.mlp.fc2.bias * layer.lambda_2)
    assert torch.allclose(model.vision.OV.AB[0], block.attn.W_V @ block.attn.W_O)
    params = model.tl_parameters()
    assert params["vision.blocks.0.attn.W_O"] is not None and torch.equal(params["vision.blocks.0.attn.W_O"], block.attn.W_O)


# ------------------------------------------------------------------------------------ processor and tiles


def hf_processor(path):
    """HF's InternVLProcessor without its video processor (the only part that needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
        return InternVLProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                                 tokenizer=AutoTokenizer.from_pretrained(path), image_seq_length=IMAGE_SEQ_LENGTH)


@pytest.mark.parametrize("sizes", [[(60, 30), (20, 20)], [(30, 70), (50, 50)], [(200, 20), (24, 24)], [(13, 91), (77, 41)]])
def test_processor_gives_hfs_tokens_and_tiles(six_b, sizes):
    path, _, model = six_b
    images = sample_images(2, seed=2, sizes=sizes)
    ours = model.prepare(images=images, text=PROMPTS)
    theirs = hf_processor(path)(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(ours.input_ids, theirs["input_ids"]) and torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert torch.equal(ours.pixel_values, theirs["pixel_values"])
    tiles = [sum(1 for image, _, _ in model.tile_layout(ours) if image == i) for i in range(2)]
    assert ours.row_images == tuple(tiles) and sum(tiles) == ours.pixel_values.shape[0]


def test_spatial_index_maps_tokens_to_tiles_cells_and_pixels(six_b):
    _, _, model = six_b
    images = sample_images(2, seed=1, sizes=SIZES)
    inputs = model.prepare(images=images, text=PROMPTS)
    index = spatial_index(model, inputs, images)
    layout = model.tile_layout(inputs)
    assert len(index) == len(layout) * IMAGE_SEQ_LENGTH and list(index["tile"].unique()) == list(range(len(layout)))
    assert all(len(p) == model.capabilities.patches_per_token for p in index["patches"])
    for image, (w, h) in enumerate(SIZES):
        cells = index[index["image"] == image]
        thumbnail, crops = cells[cells["thumbnail"]], cells[~cells["thumbnail"]]
        for part in (thumbnail, crops):  # each covers the whole image exactly once
            assert part["x0"].min() == pytest.approx(0) and part["x1"].max() == pytest.approx(w)
            assert part["y0"].min() == pytest.approx(0) and part["y1"].max() == pytest.approx(h)
            area = ((part["x1"] - part["x0"]) * (part["y1"] - part["y0"])).sum()
            assert area == pytest.approx(w * h)
    # A token's vision patches are the ones pixel shuffle puts in it: check on a tile's patch-index row.
    first = index[index["tile"] == 0]
    shuffled = pixel_shuffle(torch.arange(1, GRID * GRID + 1, dtype=torch.float32).reshape(1, -1, 1), 2)[0]
    assert [list(p) for p in first["patches"]] == shuffled.long().tolist()


def test_tiles_of_each_row_stay_with_it(six_b):
    _, _, model = six_b
    inputs = model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS)
    with torch.no_grad():
        full = model(inputs)
        second = model(inputs[1:])
    assert inputs[1:].pixel_values.shape[0] == inputs.row_images[1]
    assert max_diff(second[0], full[1], inputs.attention_mask[1].bool()) <= ATOL


def test_bad_tile_counts_are_clear_errors(six_b):
    _, _, model = six_b
    inputs = model.prepare(images=sample_images(2, seed=1, sizes=SIZES), text=PROMPTS)
    kwargs = inputs.as_kwargs()
    with pytest.raises(ValueError, match="placeholders for 8 tiles .* pixel_values holds 7 tiles"):
        model({**kwargs, "pixel_values": kwargs["pixel_values"][:-1]})
    with pytest.raises(ValueError, match=r"\[tile, channel, height, width\]"):
        model({**kwargs, "pixel_values": kwargs["pixel_values"][None]})
    with pytest.raises(ValueError, match="vision tower expects"):
        model({**kwargs, "pixel_values": kwargs["pixel_values"][..., :-4, :-4]})
    with pytest.raises(ValueError, match="more <IMG_CONTEXT> placeholders"):
        model.prepare(images=sample_images(1), text=[chat("<IMG_CONTEXT><IMG_CONTEXT>")])
    with pytest.raises(ValueError, match="without a <IMG_CONTEXT> placeholder"):
        model.prepare(images=sample_images(2), text=[chat("<IMG_CONTEXT> one")])
