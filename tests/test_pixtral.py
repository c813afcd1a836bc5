"""Pixtral / Mistral3 beyond the conformance contract: dispatch by vision tower, the spatial index, images that never
see each other or the padding, bad input (image sizes vs pixels vs placeholder rows, image tokens without images),
and random small configurations against HF."""

from __future__ import annotations

import random

import pytest
import torch
from conformance.registry import ATOL, REGISTRY, HalfPrecision, assert_hidden_states_match, hf_run, max_diff, quiet
from random_configs import BOS, IMAGE, PAD, VISION_END, VISION_START, Draw, lm_config, padded, text
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralVisionConfig,
)

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.families import HookedLlava, HookedMistral3, HookedPixtral, HookedQwen2VL, family_for
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_pixtral import chat

ENTRIES = ["pixtral", "mistral3"]


def pixtral_vision(**changes) -> PixtralVisionConfig:
    return PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=4, hidden_act="silu", **changes)


# ------------------------------------------------------------------------------------------------ dispatch


def test_the_vision_tower_picks_the_llava_family():
    pixtral = LlavaConfig(vision_config=pixtral_vision(), vision_feature_select_strategy="full")
    assert family_for(pixtral, ["LlavaForConditionalGeneration"]) is HookedPixtral
    assert family_for(LlavaConfig(), ["LlavaForConditionalGeneration"]) is HookedLlava  # CLIP
    assert family_for(Mistral3Config()) is HookedMistral3
    with pytest.raises(NotImplementedError, match="'default'"):
        family_for(LlavaConfig(vision_config=pixtral_vision()), ["LlavaForConditionalGeneration"]).config_from_hf(
            LlavaConfig(vision_config=pixtral_vision(), vision_feature_select_strategy="default"))
    with pytest.raises(NotImplementedError, match="several vision_feature_layer"):
        HookedMistral3.config_from_hf(Mistral3Config(vision_feature_layer=[-2, -1]))
    clip_mistral3 = Mistral3Config(vision_config={"model_type": "clip_vision_model"})
    with pytest.raises(NotImplementedError, match="clip_vision_model.*'pixtral'"):
        family_for(clip_mistral3).config_from_hf(clip_mistral3)


def test_a_family_class_loads_its_own_subfamily_only(checkpoints):
    model = quiet(HookedLlava.from_pretrained, checkpoints["pixtral"], load_processor=False)
    assert type(model) is HookedPixtral
    with pytest.raises(ValueError, match="not a HookedQwen2VL"):
        quiet(HookedQwen2VL.from_pretrained, checkpoints["pixtral"], load_processor=False)


@pytest.mark.parametrize("name", ENTRIES)
def test_processor_expands_as_hfs_counts(loaded, name):
    """tl_vlm's processor (HF's needs torchvision) against HF's own count, (cols + 1) * rows per image from its
    resize rule, and HF's row layout: [IMG] x cols then [IMG_BREAK], the last one [IMG_END]."""
    import numpy as np
    from transformers.models.pixtral.image_processing_pil_pixtral import get_resize_output_image_size

    processor = loaded(name).model.processor
    side = processor.patch_size * processor.spatial_merge_size
    longest = processor.image_processor.size["longest_edge"]
    sizes = [(40, 24), (16, 28), (7, 90), (33, 33), (3, 5)]  # (w, h): wide, tall, extreme, square, tiny
    inputs = processor(images=sample_images(len(sizes), sizes=sizes), text=[chat("[IMG]" * len(sizes))])
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    body = tokens[tokens.index("[INST]") + 1 : tokens.index("[/INST]")]
    expected = []
    for w, h in sizes:
        rows, cols = (n // side for n in get_resize_output_image_size(np.zeros((h, w, 3)), (longest, longest), (side, side)))
        expected += (["[IMG]"] * cols + ["[IMG_BREAK]"]) * rows
        expected[-1] = "[IMG_END]"
    assert body == expected
    assert [[h // side, w // side] for h, w in inputs["image_sizes"].tolist()] == [
        [n // side for n in get_resize_output_image_size(np.zeros((h, w, 3)), (longest, longest), (side, side))]
        for w, h in sizes]


# ------------------------------------------------------------------------------------- layout and spatial index


@pytest.mark.parametrize("name", ENTRIES)
def test_spatial_index_points_at_the_feeding_patches(loaded, name):
    pair = loaded(name)
    model, inputs = pair.model, pair.cases["multi_image"]
    m = model.vlm_cfg.merge_size
    index = spatial_index(model, inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["hook_image_embed", "projector.hook_out"])
    layout = model.vision.patch_layout(inputs.image_sizes)
    for row in index.itertuples():
        token = row.row * (layout.grids[row.image][1] // m) + row.col
        assert torch.equal(cache["hook_image_embed"][row.batch, row.position], cache["projector.hook_out"][row.tile, token])
        assert layout.positions[row.tile, row.patch].tolist() == [row.row * m, row.col * m]  # top-left of its block
        block = layout.positions[row.tile, model.token_patches(row._asdict())].tolist()
        assert block == [[row.row * m + i, row.col * m + j] for i in range(m) for j in range(m)]
        assert (row.x1 - row.x0, row.y1 - row.y0) == (model.vlm_cfg.token_size,) * 2
    originals = [(80, 48), (48, 72)]  # (w, h): the sizes the processor resized from
    cells = model.image_token_cells(inputs, originals)
    for image, (w, h) in enumerate(originals):
        last = [c for c in cells if c["image"] == image][-1]
        assert (last["x1"], last["y1"]) == pytest.approx((w, h))


@pytest.mark.parametrize("name", ENTRIES)
def test_images_see_neither_each_other_nor_the_padding(loaded, name):
    pair = loaded(name)
    model, inputs = pair.model, pair.cases["multi_image"]
    valid = model.vision.patch_layout(inputs.image_sizes).valid
    assert not bool(valid.all()), "the two images must differ in size"

    def scramble_second_image_and_padding(x, hook):
        x[1] = torch.randn_like(x[1]) * 10
        x[0][~valid[0]] = torch.randn_like(x[0][~valid[0]]) * 10
        return x

    blocks = lambda n: n.startswith("vision.blocks.1")  # noqa: E731
    with torch.no_grad():
        _, clean = model.run_with_cache(inputs, names_filter=blocks)
        with model.hooks(fwd_hooks=[("vision.hook_embed", scramble_second_image_and_padding)]):
            _, edited = model.run_with_cache(inputs, names_filter=blocks)
    first = valid[0]
    resid = "vision.blocks.1.hook_resid_post"
    assert torch.allclose(edited[resid][0][first], clean[resid][0][first], atol=1e-6)
    assert not torch.allclose(edited[resid][1][valid[1]], clean[resid][1][valid[1]])
    pattern = clean["vision.blocks.1.attn.hook_pattern"]  # [image, head, query, key]
    for image in range(2):
        rows = pattern[image][:, valid[image]]
        assert torch.allclose(rows[..., valid[image]].sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(rows[..., ~valid[image]] == 0)


@pytest.mark.parametrize("name", ENTRIES)
def test_pooling_skips_the_padding_of_smaller_images(loaded, tmp_path, name):
    """Extraction and probing features of a batch of differently sized images equal those of each image alone."""
    import pandas as pd

    from tl_vlm.analysis.probing import pooled_activations
    from tl_vlm.store import ExtractConfig, extract, load

    pair = loaded(name)
    model = pair.model
    hooks = ["vision.blocks.1.hook_resid_post", "projector.hook_in", "projector.hook_out"]
    (tmp_path / "images").mkdir()
    images = sample_images(2, seed=4, sizes=[(40, 24), (16, 28)])
    for i, image in enumerate(images):
        image.save(tmp_path / "images" / f"{i}.png")
    pd.DataFrame([{"id": i, "prompt": "What colour?", "image": f"{i}.png", "label": 0} for i in range(2)]).to_csv(
        tmp_path / "data.csv", index=False)
    frames = {}
    for batch_size in (1, 2):
        config = ExtractConfig(model_path=str(pair.path), output_db=str(tmp_path / f"{batch_size}.db"), modules=hooks,
                               batch_size=batch_size, dataset={"local_dataset_path": str(tmp_path / "data.csv"),
                                                               "image_dataset_path": str(tmp_path / "images")})
        assert quiet(extract, config, progress=False)["done"] == 2
        frames[batch_size] = load(tmp_path / f"{batch_size}.db").sort_values(["image_id", "layer"])
    for alone, batched in zip(frames[1].itertuples(), frames[2].itertuples()):
        assert torch.allclose(alone.tensor, batched.tensor, atol=1e-5), (alone.layer, alone.image_id)
    prompts = [chat("[IMG]What colour?")] * 2
    together = pooled_activations(model, [model.prepare(images=images, text=prompts)], hooks)
    apart = pooled_activations(model, [model.prepare(images=[im], text=prompts[:1]) for im in images], hooks)
    for hook in hooks:
        assert torch.allclose(together[hook], apart[hook], atol=1e-5), hook


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ENTRIES)
def test_image_sizes_that_disagree_with_the_pixels_are_refused(loaded, name):
    pair = loaded(name)
    model, batch = pair.model, pair.batch()
    kwargs = batch.as_kwargs()
    sizes, pixels = batch.image_sizes, batch.pixel_values
    side = model.vlm_cfg.token_size
    with pytest.raises(ValueError, match="needs image_sizes"):
        model({k: v for k, v in kwargs.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match=r"one \(height, width\) per image"):
        model({**kwargs, "image_sizes": sizes[:1]})
    with pytest.raises(ValueError, match="disagree with pixel_values"):
        model({**kwargs, "image_sizes": sizes + pixels.shape[-1]})  # larger than the padded pixels
    with pytest.raises(ValueError, match="disagree with pixel_values|multiple of"):
        model({**kwargs, "image_sizes": sizes - side // 2})  # not whole tokens
    with pytest.raises(ValueError, match=r"\[image, 3, height, width\]"):
        model({**kwargs, "pixel_values": pixels[0]})
    # Height and width swapped (in pixels padded to a square, so they fit): the same number of tokens, in rows of
    # the wrong length.
    assert sizes[0, 0] != sizes[0, 1]
    side = max(pixels.shape[-2:])
    square = torch.nn.functional.pad(pixels, (0, side - pixels.shape[-1], 0, side - pixels.shape[-2]))
    with pytest.raises(ValueError, match="runs of"):
        model({**kwargs, "pixel_values": square, "image_sizes": sizes.flip(-1)})


@pytest.mark.parametrize("name", ENTRIES)
def test_placeholder_rows_must_follow_the_image_grid(loaded, name):
    pair = loaded(name)
    model, batch = pair.model, pair.batch()
    ids = batch.input_ids.clone()
    breaks = (ids[0] == model.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")).nonzero()[:, 0]
    first = int(breaks[0])
    image, row_end = int(ids[0, first - 1]), int(ids[0, first])
    ids[0, first - 1], ids[0, first] = row_end, image  # a row one short, the next one long
    with pytest.raises(ValueError, match="runs of .* image_sizes give rows of"):
        model({**batch.as_kwargs(), "input_ids": ids})


@pytest.mark.parametrize("name", ENTRIES)
def test_an_image_token_without_an_image_is_an_error(loaded, name):
    model = loaded(name).model
    with pytest.raises(ValueError, match="no pixel_values"):
        model(chat("[IMG]What is the colour?"))
    image = sample_images(1, sizes=[(40, 24)])
    with pytest.raises(ValueError, match=r"more \[IMG\] placeholders in the text than images"):
        model.prepare(images=image, text=chat("[IMG]What colour? [IMG]Which shape?"))
    with pytest.raises(ValueError, match=r"1 images have no \[IMG\] placeholder"):
        model.prepare(images=image * 2, text=chat("[IMG]What colour?"))


# ------------------------------------------------------------------------------------------ random configs


def draw_pixtral(seed: int, variant: str) -> Draw:
    """Random tower shapes, feature layers, GQA and 2-3 images of random sizes (one prompt, then the rest)."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    patch, merge = rng.choice([2, 3, 4]), (1 if variant == "pixtral" else 2)
    vision = PixtralVisionConfig(
        hidden_size=heads * rng.choice([8, 12, 16]), intermediate_size=rng.choice([32, 48]), num_attention_heads=heads,
        num_hidden_layers=rng.choice([2, 3]), patch_size=patch, image_size=8 * patch * merge, hidden_act="silu",
        rope_parameters={"rope_type": "axial", "rope_theta": rng.choice([1e4, 1e2])}, initializer_range=0.08,
    )
    lm = lm_config(rng, rng.choice(["mistral", "llama"]))
    fields = dict(vision_config=vision, text_config=lm, image_token_index=IMAGE, projector_hidden_act="gelu",
                  multimodal_projector_bias=rng.random() < 0.5, tie_word_embeddings=lm.tie_word_embeddings)
    if variant == "pixtral":
        config = LlavaConfig(**fields, vision_feature_select_strategy="full",
                             vision_feature_layer=rng.choice([-1, -2, [-2, -1], [0, -1]]))
        hf_class = LlavaForConditionalGeneration
    else:
        config = Mistral3Config(**fields, spatial_merge_size=2, vision_feature_layer=rng.choice([-1, -2]))
        hf_class = Mistral3ForConditionalGeneration

    def make_inputs(model, rng):
        side = patch * merge
        sizes = [[side * rng.randint(1, 4), side * rng.randint(1, 4)] for _ in range(rng.choice([2, 3]))]
        pixels = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for i, (h, w) in enumerate(sizes):
            pixels[i, :, :h, :w] = torch.randn(3, h, w)

        def rows(h, w):  # [IMG] per token, VISION_START as [IMG_BREAK], VISION_END as [IMG_END]
            out = [tok for _ in range(h // side) for tok in [IMAGE] * (w // side) + [VISION_START]]
            return out[:-1] + [VISION_END]

        first = [BOS, *text(rng, 2), *rows(*sizes[0]), *text(rng, 3)]
        rest = [BOS, *text(rng, 5)] + [t for h, w in sizes[1:] for t in rows(h, w) + text(rng, 1)]
        rest += text(rng, 1) if len(rest) == len(first) else []  # the batch must be padded
        ids, mask = padded([first, rest], rng.choice(["left", "right"]))
        assert PAD not in (first + rest)
        return VLMInputs(ids, pixels, mask, image_sizes=torch.tensor(sizes))

    label = f"{variant}-p{patch}-d{vision.hidden_size}-h{heads}-L{vision.num_hidden_layers}-f{config.vision_feature_layer}"
    return Draw(variant, label, seed, hf_class, config, make_inputs)


DRAWS = [draw_pixtral(seed, variant) for seed, variant in ((5, "pixtral"), (9, "pixtral"), (3, "mistral3"), (10, "mistral3"))]


@pytest.fixture(scope="module")
def saved_draws(tmp_path_factory):
    built: dict[int, tuple] = {}

    def get(draw: Draw):
        if id(draw) not in built:
            hf = draw.build()
            path = tmp_path_factory.mktemp("pixtral_draw")
            hf.save_pretrained(path)
            built[id(draw)] = (path, hf, draw.inputs(hf))
        return built[id(draw)]

    return get


@pytest.mark.parametrize("draw", [pytest.param(d, id=d.label) for d in DRAWS])
def test_random_configs_match_hf(saved_draws, draw):
    path, hf, inputs = saved_draws(draw)
    model = quiet(HookedVLM.from_pretrained, path, load_processor=False)
    entry = REGISTRY[draw.entry]
    hf_logits, hidden = hf_run(entry, hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    assert max_diff(logits, hf_logits, inputs.attention_mask.bool()) <= ATOL
    assert_hidden_states_match(model, cache, hidden, inputs)
    diffs = HalfPrecision.load(draw.hf_class, path, torch.bfloat16).logit_diffs(inputs)
    assert diffs == dict.fromkeys(diffs, 0.0), diffs
