"""HookedCLIP on SigLIP 2 (NaFlex) against HF: every hidden state of both towers, embeddings and logits in fp32 with
images of different aspect ratios in one batch (padding and masks exercised), half precision bit for bit, head
ablation = HF surgery, the resized positions, padded patches that never leak, random configs, the spatial index,
retrieval, store extraction, saving, TL patching on tower views and bad input. Fixture: the tiny saved SigLIP 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conformance.registry import ATOL, quiet
from dual_encoder_checks import (
    TEXTS, assert_half_precision_is_hf_bit_for_bit, assert_head_ablation_equals_hf_surgery, assert_hidden_states_match,
)
from transformer_lens import patching
from transformers import AutoModel, Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from tl_vlm import HookedCLIP, HookedVLM
from tl_vlm.analysis import retrieval
from tl_vlm.components.naflex_embed import resize_positions
from tl_vlm.loading import load_model
from tl_vlm.zoo.data import make_examples, sample_images
from tl_vlm.zoo.tiny_siglip2 import MAX_NUM_PATCHES, PATCH_SIZE, build_tiny_siglip2

SIZES = [(64, 32), (40, 40), (24, 72)]  # (w, h): a wide, a square and a tall image -> 3x6, 4x4 and 8x3 patches


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tiny_siglip2(tmp_path_factory.mktemp("siglip2") / "siglip2")


@pytest.fixture(scope="module")
def loaded(path):
    models = {}

    def get(dtype=torch.float32):
        if dtype not in models:
            models[dtype] = (quiet(AutoModel.from_pretrained, path, dtype=dtype).eval(),
                             quiet(HookedCLIP.from_pretrained, path, dtype=dtype))
        return models[dtype]

    return get


def _images(sizes=SIZES):
    return sample_images(len(sizes), 0, sizes=sizes)


def _inputs(model, texts=TEXTS, sizes=SIZES, **kwargs):
    return model.prepare(images=_images(sizes), text=texts, **kwargs)


def test_every_hidden_state_and_embedding_matches_hf(loaded):
    hf, model = loaded()
    inputs = _inputs(model)
    assert inputs.spatial_shapes.tolist() == [[3, 6], [4, 4], [8, 3]]  # stretched, kept and shrunk position grids
    assert inputs.pixel_attention_mask.sum(-1).tolist() == [18, 16, 24]  # two images padded, one not
    assert not bool(inputs.attention_mask.all())  # padded texts too
    with torch.no_grad():
        ref = hf(**inputs.as_kwargs(), output_hidden_states=True)
        logits, cache = model.run_with_cache(inputs)
        image = hf.get_image_features(pixel_values=inputs.pixel_values, pixel_attention_mask=inputs.pixel_attention_mask,
                                      spatial_shapes=inputs.spatial_shapes).pooler_output
        text = hf.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
        hf_positions = Siglip2VisionEmbeddings.resize_positional_embeddings(
            hf.vision_model.embeddings.position_embedding.weight.reshape(4, 4, -1), inputs.spatial_shapes, MAX_NUM_PATCHES)
    assert logits.shape == (3, 3)
    assert (logits - ref.logits_per_image).abs().max() <= ATOL
    assert (model.encode_image(**model.image_inputs(_images())) - image).abs().max() <= ATOL
    assert (model.encode_text(inputs.input_ids, inputs.attention_mask) - text).abs().max() <= ATOL
    assert (cache["vision.hook_embed_out"] - image).abs().max() <= ATOL
    assert (cache["text.hook_embed_out"] - text).abs().max() <= ATOL
    assert (cache["vision.hook_pos_embed"] - hf_positions).abs().max() <= 1e-6
    assert (cache["vision.hook_embed"] + cache["vision.hook_pos_embed"] - cache["vision.blocks.0.hook_resid_pre"]).abs().max() == 0
    assert_hidden_states_match(cache, model, ref)
    ln_post = model.vision.ln_post
    assert (cache["vision.ln_post.hook_normalized"] * ln_post.w + ln_post.b
            - ref.vision_model_output.last_hidden_state).abs().max() <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", [SIZES, [(24, 72), (24, 72)]], ids=["padded", "unpadded"])
def test_half_precision_is_hf_bit_for_bit_and_caching_changes_nothing(loaded, dtype, sizes):
    hf, model = loaded(dtype)
    inputs = _inputs(model, texts=TEXTS[:len(sizes)], sizes=sizes).as_kwargs()
    assert bool(inputs["pixel_attention_mask"].all()) == (len(sizes) == 2)  # HF drops an all-real mask: so do we
    assert_half_precision_is_hf_bit_for_bit(hf, model, inputs, dtype)


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_head_ablation_equals_hf_surgery(loaded, path, tower):
    _, model = loaded()
    assert_head_ablation_equals_hf_surgery(model, path, _inputs(model), tower)


def test_padded_patches_never_reach_real_patches_or_the_embedding(loaded):
    _, model = loaded()
    inputs = _image_only(model)
    real = inputs["pixel_attention_mask"].bool()
    noisy = dict(inputs, pixel_values=torch.where(real[..., None], inputs["pixel_values"], 100 * torch.randn_like(inputs["pixel_values"])))
    longer = {  # six more padded patches per image
        "pixel_values": F.pad(inputs["pixel_values"], (0, 0, 0, 6), value=3.0),
        "pixel_attention_mask": F.pad(inputs["pixel_attention_mask"], (0, 6)),
        "spatial_shapes": inputs["spatial_shapes"],
    }
    with torch.no_grad():
        base = model.encode_image(**inputs)
        last = model.vision(**inputs, keep=[2])[2]
        for other in (noisy, longer):
            assert (model.encode_image(**other) - base).abs().max() <= 1e-5
            hidden = model.vision(**other, keep=[2])[2][:, :real.shape[1]]
            assert (hidden[real] - last[real]).abs().max() <= 1e-5
        _, cache = model.run_with_cache(_inputs(model), names_filter="vision.head.attn.hook_pattern")
    pattern = cache["vision.head.attn.hook_pattern"][0]  # image 0: [head, 1, patch]
    assert pattern[..., ~real[0]].abs().max() == 0 and pattern[..., real[0]].sum(-1).sub(1).abs().max() <= 1e-6


def _image_only(model, sizes=SIZES) -> dict:
    return model.image_inputs(_images(sizes))


@pytest.mark.parametrize("side, h, w", [(4, 3, 6), (4, 8, 3), (5, 2, 9), (3, 7, 7), (6, 6, 6), (4, 1, 1)])
def test_position_resize_is_antialiased_bilinear(side, h, w):
    grid = torch.randn(side, side, 8, generator=torch.Generator().manual_seed(side * 100 + h * 10 + w))
    ours = resize_positions(grid, torch.tensor([[h, w]]), h * w + 3)
    torch_resized = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=True)[0].permute(1, 2, 0).reshape(h * w, -1)
    assert (ours[0, :h * w] - torch_resized).abs().max() <= 1e-5
    assert torch.equal(ours[0, h * w:], ours[0, :1].expand(3, -1))  # padding reads the first position, as HF


def _random_siglip2(seed: int) -> Siglip2Model:
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    heads = pick([2, 4])
    d_vision, d_text = heads * pick([3, 4, 6]), heads * pick([3, 5])
    vision = dict(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=2, num_attention_heads=heads,
                  patch_size=pick([2, 4]), num_patches=pick([4, 9, 16, 25]), hidden_act=pick(["gelu_pytorch_tanh", "gelu"]),
                  layer_norm_eps=pick([1e-6, 1e-5]))
    text = dict(vocab_size=40, hidden_size=d_text, intermediate_size=2 * d_text, num_hidden_layers=2,
                num_attention_heads=heads, max_position_embeddings=10, projection_size=d_vision, pad_token_id=0,
                eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    hf = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim <= 1:
                p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_configs_match_hf(seed):
    hf = _random_siglip2(seed)
    model = HookedCLIP.from_hf_model(hf)
    vc = hf.config.vision_config
    g = torch.Generator().manual_seed(seed)
    length = 12
    shapes = torch.tensor([[3, 4], [1, 5], [2, 2]])  # 12 (no padding), 5 and 4 real patches
    pixels = torch.randn(3, length, vc.num_channels * vc.patch_size**2, generator=g)
    mask = (torch.arange(length)[None] < shapes.prod(-1)[:, None]).int()
    ids = torch.randint(2, 40, (2, 7), generator=g)
    text_mask = torch.ones_like(ids)
    text_mask[1, :3] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=text_mask, pixel_values=pixels, pixel_attention_mask=mask,
                  spatial_shapes=shapes)
    with torch.no_grad():
        ref = hf(**kwargs, output_hidden_states=True)
        logits, cache = model.run_with_cache(kwargs)
    assert (logits - ref.logits_per_image).abs().max() <= ATOL
    assert_hidden_states_match(cache, model, ref)
    assert (cache["vision.hook_embed_out"] - ref.vision_model_output.pooler_output).abs().max() <= ATOL
    # the patchifier is a view of HF's linear weight, in the conv layout
    assert model.vision.embed.W_patch.data_ptr() == hf.vision_model.embeddings.patch_embedding.weight.data_ptr()


def test_real_size_converts_on_the_meta_device():
    with torch.device("meta"):
        hf = Siglip2Model(Siglip2Config())  # HF's defaults: google/siglip2-base-patch16-naflex's shape
    model = HookedCLIP.from_hf_model(hf)
    assert model.vision.embed.W_patch.shape == (768, 3, 16, 16) and model.vlm_cfg.vision.grid == 16
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_spatial_index_follows_each_images_grid(loaded):
    _, model = loaded()
    inputs = _inputs(model)
    cells = model.image_token_cells(inputs, SIZES)
    assert len(cells) == 3 * MAX_NUM_PATCHES  # every vision position, padding included
    for image, ((w, h), (rows, cols)) in enumerate(zip(SIZES, inputs.spatial_shapes.tolist())):
        mine = [c for c in cells if c["image"] == image]
        patches = [c for c in mine if c["kind"] == "patch"]
        assert [c["patch"] for c in mine] == list(range(MAX_NUM_PATCHES))
        assert len(patches) == rows * cols == int(inputs.pixel_attention_mask[image].sum())
        assert all(c["kind"] == "padding" and "x0" not in c for c in mine[rows * cols:])
        last = patches[-1]
        assert (last["row"], last["col"]) == (rows - 1, cols - 1)
        assert (last["x1"], last["y1"]) == (pytest.approx(w), pytest.approx(h))  # the boxes tile the original image
        area = sum((c["x1"] - c["x0"]) * (c["y1"] - c["y0"]) for c in patches)
        assert area == pytest.approx(w * h)
    processed = model.image_token_cells(inputs, None)
    assert processed[17]["x1"] == 6 * PATCH_SIZE and processed[17]["y1"] == 3 * PATCH_SIZE


def test_retrieval_and_tuning_take_the_naflex_inputs(loaded):
    from tl_vlm.tuning.negclip import batch_loss

    hf, model = loaded()
    examples = make_examples(6, 0)
    images = [e.image for e in examples]
    image_embeds, text_embeds = retrieval.embed(model, images, TEXTS, batch_size=4)
    inputs = model.prepare(images=images, text=TEXTS)
    with torch.no_grad():
        ref = hf(**inputs.as_kwargs())
    assert (model.similarity(image_embeds, text_embeds) - ref.logits_per_image).abs().max() <= ATOL
    table = retrieval.evaluate(model, examples)
    assert set(table.metric) == {"retrieval", "hard_negative"} and table.value.between(0, 1).all()
    loss = batch_loss(model, images[:2], TEXTS[:2], TEXTS[1:])
    loss.backward()
    assert model.vision.embed.W_pos.grad is not None and model.vision.embed.W_pos.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_store_extraction_pools_real_patches_only(dataset, path, tmp_path, pooling):
    from PIL import Image

    from tl_vlm.store import ExtractConfig, extract, load

    hooks = ["vision.blocks.0.hook_resid_post", "vision.hook_embed_out", "vision.head.hook_attn_out", "vision.head.attn.hook_k"]
    config = ExtractConfig(model_path=str(path), output_db=str(tmp_path / "out.db"), modules=hooks, batch_size=2,
                           pooling_method=pooling,
                           dataset={"local_dataset_path": str(dataset / "data.csv"), "image_dataset_path": str(dataset / "images")})
    assert quiet(extract, config, progress=False) == {"done": 5, "skipped": 0, "failed": 0}
    stored = load(tmp_path / "out.db")
    model = quiet(HookedCLIP.from_pretrained, path)
    row = stored[stored.image_id == stored.image_id.iloc[0]]
    inputs = model.prepare(images=[Image.open(row.image_path.iloc[0]).convert("RGB")], text=[row.prompt.iloc[0]])
    real = inputs.pixel_attention_mask[0].bool()
    assert not bool(real.all())  # the padding is there to leave out
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    def pooled(positions):  # the pooling head's hooks have the probe's one position
        return positions.mean(0, keepdim=True) if pooling == "mean" else positions[None]

    expected = {hooks[0]: pooled(cache[hooks[0]][0][real]), hooks[1]: cache[hooks[1]][0][None],
                hooks[2]: pooled(cache[hooks[2]][0]), hooks[3]: pooled(cache[hooks[3]][0][real])}
    for hook in hooks:
        tensor = row[row.layer == hook].tensor.iloc[0]
        assert tensor.shape == expected[hook].shape and torch.allclose(tensor.float(), expected[hook], atol=1e-5), hook


def test_tl_patching_on_the_vision_tower_view(loaded):
    _, model = loaded()
    clean = _inputs(model, texts=["a red bar"], sizes=[(64, 32)])
    corrupt = _inputs(model, texts=["a red bar"], sizes=[(64, 32)])
    corrupt.pixel_values = corrupt.pixel_values.flip(1)  # same grid, patches reordered

    def metric(logits):
        return logits[0, 0]

    vision = model.tower("vision")
    _, cache = vision.run_with_cache(clean)
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(vision, vision.inputs(corrupt), cache, metric)
        clean_metric = metric(model(clean))
    assert result.shape == (vision.cfg.n_layers, MAX_NUM_PATCHES)
    n = vision.cfg.n_layers  # the view's decomposition is exact over padded rows too
    assert (cache.decompose_resid(layer=n).sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() <= 1e-5
    everything = model.run_with_hooks(corrupt, fwd_hooks=[("vision.blocks.1.hook_resid_pre", lambda x, hook: cache["blocks.1.hook_resid_pre"])])
    assert torch.allclose(everything[0, 0], clean_metric, atol=1e-5)


def test_save_pretrained_round_trip_and_loaders(loaded, path, tmp_path):
    hf, model = loaded()
    inputs = _inputs(model)
    model.save_pretrained(tmp_path / "saved")
    again = quiet(AutoModel.from_pretrained, tmp_path / "saved").eval()
    with torch.no_grad():
        assert (again(**inputs.as_kwargs()).logits_per_image - hf(**inputs.as_kwargs()).logits_per_image).abs().max() == 0
    assert isinstance(quiet(load_model, path), HookedCLIP)
    with pytest.raises(NotImplementedError, match="HookedCLIP"):
        quiet(HookedVLM.from_pretrained, path)


def test_weight_processing_keeps_logits(loaded, path):
    _, model = loaded()
    inputs = _inputs(model)
    processed = quiet(HookedCLIP.from_pretrained, path, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    with torch.no_grad():
        assert (processed(inputs) - model(inputs)).abs().max() <= ATOL
    assert processed.vision.blocks[0].ln1.w is None and processed.vision.blocks[1].attn.b_V.abs().max() == 0


def test_hooks_command_runs_the_naflex_tower(path, capsys):
    from tl_vlm.cli import main

    assert quiet(main, ["hooks", str(path), "--shapes", "--filter", r"^vision\.(hook_pos_embed|head\.attn\.hook_pattern)$"]) == 0
    out = capsys.readouterr().out
    assert f"(1, {MAX_NUM_PATCHES}, 32)" in out and f"(1, 4, 1, {MAX_NUM_PATCHES})" in out


def test_bad_input_gets_clear_errors(loaded):
    hf, model = loaded()
    inputs = _inputs(model)
    kwargs = inputs.as_kwargs()
    pixels = kwargs["pixel_values"]
    with pytest.raises(ValueError, match="pixel_attention_mask .* and spatial_shapes"):
        model(input_ids=inputs.input_ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="pixel_attention_mask .* and spatial_shapes"):
        model.encode_image(pixels, spatial_shapes=inputs.spatial_shapes)
    too_big = inputs.spatial_shapes.clone()
    too_big[1] = torch.tensor([5, 5])  # 25 patches > 24 per image
    with pytest.raises(ValueError, match=r"images \[1\].*max_num_patches"):
        model.encode_image(pixels, inputs.pixel_attention_mask, too_big)
    wrong_mask = inputs.pixel_attention_mask.clone()
    wrong_mask[0, -1] = 1
    with pytest.raises(ValueError, match=r"pixel_attention_mask of images \[0\]"):
        model.encode_image(pixels, wrong_mask, inputs.spatial_shapes)
    with pytest.raises(ValueError, match=r"\[image, patch, 768\]"):
        model.encode_image(torch.zeros(1, 3, 64, 64), inputs.pixel_attention_mask[:1], inputs.spatial_shapes[:1])
    with pytest.raises(ValueError, match="do not fit pixel_values"):
        model.encode_image(pixels, inputs.pixel_attention_mask[:2], inputs.spatial_shapes)
    from tl_vlm.analysis import probing

    with pytest.raises(TypeError, match="HookedCLIP"):
        probing.pooled_activations(model, [inputs], ["vision.blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="integer patch counts"):
        model.encode_image(pixels, inputs.pixel_attention_mask, inputs.spatial_shapes.float())
    with pytest.raises(ValueError, match="image_inputs"):
        model.pixel_values(_images())
    n_ctx = model.vlm_cfg.text.n_ctx
    with pytest.raises(ValueError, match=rf"{n_ctx} positions.*truncation=True"):
        model(model.prepare(images=_images()[:1], text=[" ".join(["red"] * (n_ctx + 4))]))
    # more patches per image through the processor: still HF's answer
    wide = model.prepare(images=_images()[:1], text=TEXTS[:1], max_num_patches=40)
    assert wide.pixel_values.shape[1] == 40 and int(wide.spatial_shapes.prod()) > MAX_NUM_PATCHES
    with torch.no_grad():
        expected = hf(**wide.as_kwargs()).logits_per_image
        torch.testing.assert_close(model(wide), expected, atol=1e-4, rtol=0)


def test_fixed_size_towers_refuse_naflex_inputs():
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    text = dict(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=6, projection_size=8)
    model = HookedCLIP.from_hf_model(SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval())
    with pytest.raises(ValueError, match="SigLIP 2's .* refusing to drop"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), pixel_values=torch.zeros(1, 3, 8, 8),
              pixel_attention_mask=torch.ones(1, 4, dtype=torch.long))
