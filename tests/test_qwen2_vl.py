"""Qwen2-VL and Qwen2.5-VL against HF (fp32, max abs diff <= 1e-4): tiny checkpoints saved and loaded back.

transformers' Qwen2VLProcessor cannot be built without torchvision (its video processor needs it), so
``prepare`` below does what the processor does: the image processor cuts the images, each
``<|image_pad|>`` / ``<|video_pad|>`` is expanded to its token count, ``mm_token_type_ids`` marks them.
Videos are built from frames with the image processor's layout (``temporal_patch_size`` frames per row).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_qwen_vl import VARIANTS, build_tiny_qwen_vl

ATOL = 1e-4
IMAGE, VIDEO = "<|image_pad|>", "<|video_pad|>"
VISION = "<|vision_start|>{}<|vision_end|>"
SIZES = [(40, 24), (24, 32)]  # (w, h): 6x10 and 8x6 patch grids, 15 and 12 tokens
HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


class Qwen:
    """HF reference, HookedVLM, tokenizer and image processor of one saved tiny checkpoint."""

    def __init__(self, variant: str, path):
        self.variant = variant
        self.hf = HF_CLASSES[variant].from_pretrained(path).eval()
        with warnings.catch_warnings():  # without torchvision HF's processor cannot load: a warning, no processor
            warnings.simplefilter("ignore")
            self.model = HookedVLM.from_pretrained(path)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.images = AutoImageProcessor.from_pretrained(path)
        self.merge = self.images.merge_size

    def prepare(self, texts: list[str], images=None, video=None) -> VLMInputs:
        batch = {}
        counts = {IMAGE: [], VIDEO: []}
        if images is not None:
            batch.update(self.images(images=images, return_tensors="pt"))
            counts[IMAGE] = (batch["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        if video is not None:
            batch["pixel_values_videos"], batch["video_grid_thw"] = self.video(video)
            counts[VIDEO] = (batch["video_grid_thw"].prod(-1) // self.merge**2).tolist()
            if self.variant == "qwen2_5_vl":
                batch["second_per_grid_ts"] = torch.tensor([0.5])  # 2 frames per temporal patch at 4 fps
        expanded = []
        for text in texts:
            for token, n in counts.items():
                parts = text.split(token)
                text = parts[0] + "".join(token * n.pop(0) + rest for rest in parts[1:])
            expanded.append(text)
        tokens = self.tok(expanded, return_tensors="pt", padding=True)
        ids = tokens["input_ids"]
        image_id, video_id = self.tok.convert_tokens_to_ids([IMAGE, VIDEO])
        batch.update(tokens, mm_token_type_ids=(ids == image_id).int() + 2 * (ids == video_id).int())
        return VLMInputs.from_mapping(batch)

    def video(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values_videos as Qwen2VLVideoProcessor lays them out: row = (channel, frame pair, patch, patch)."""
        per_frame = self.images(images=frames, return_tensors="pt")
        _, h, w = per_frame["image_grid_thw"][0].tolist()
        tp, p = self.images.temporal_patch_size, self.images.patch_size
        rows = per_frame["pixel_values"].view(len(frames), h * w, 3, tp, p, p)[:, :, :, 0]  # each frame once
        rows = rows.view(len(frames) // tp, tp, h * w, 3, p, p).permute(0, 2, 3, 1, 4, 5)
        return rows.reshape(-1, 3 * tp * p * p), torch.tensor([[len(frames) // tp, h, w]])

    def case(self, name: str) -> VLMInputs:
        images = sample_images(2, seed=1, sizes=SIZES)
        if name == "two_images":
            image = VISION.format(IMAGE)
            return self.prepare([chat(f"{image}What colour? {image}Which shape?")], images)
        if name == "padded_batch":
            return self.prepare(
                [chat(f"{VISION.format(IMAGE)}What colour?"),
                 chat(f"Describe the shape in this picture please: {VISION.format(IMAGE)} is it a square or a circle")],
                images,
            )
        frames = sample_images(4, seed=2, sizes=[(24, 16)] * 4)  # 2 temporal patches of a 4x6 patch grid
        prompt = chat(f"{VISION.format(VIDEO)}What moves? Like {VISION.format(IMAGE)}?")
        return self.prepare([prompt], images[:1], frames)

    def hf_run(self, inputs: VLMInputs) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """HF logits, language layer outputs, and vision block outputs in tl_vlm's [image, patch, d] layout."""
        language, vision = [], []
        handles = [layer.register_forward_hook(lambda m, i, o: language.append(o))
                   for layer in self.hf.model.language_model.layers]
        handles += [block.register_forward_hook(lambda m, i, o: vision.append(o))
                    for block in self.hf.model.visual.blocks]
        try:
            with torch.no_grad():
                logits = self.hf(**inputs.as_kwargs()).logits
        finally:
            for handle in handles:
                handle.remove()
        # HF runs images, then videos, each as one packed sequence (Qwen2.5-VL: in window order).
        depth = len(self.hf.model.visual.blocks)
        runs = [grid for grid in (inputs.image_grid_thw, inputs.video_grid_thw) if grid is not None]
        per_block = [[self._unpack(vision[r * depth + i], grid) for r, grid in enumerate(runs)] for i in range(depth)]
        return logits, language, [[row for rows in block for row in rows] for block in per_block]

    def _unpack(self, packed: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        vc = self.hf.config.vision_config
        if self.variant == "qwen2_5_vl":
            order, _ = get_vision_window_index(grid, self.merge, vc.window_size, vc.patch_size)
            units = packed.view(-1, self.merge**2, packed.shape[-1])
            natural = torch.empty_like(units)
            natural[order] = units
            packed = natural.view_as(packed)
        return list(packed.split(grid.prod(-1).tolist()))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {variant: build_tiny_qwen_vl(root / variant, variant, seed=0) for variant in VARIANTS}


@pytest.fixture(scope="module", params=VARIANTS)
def qwen(request, checkpoints) -> Qwen:
    return Qwen(request.param, checkpoints[request.param])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", ["two_images", "padded_batch", "video"])
def test_logits_and_every_hidden_state_match_hf(qwen, case):
    inputs = qwen.case(case)
    if case == "padded_batch":
        assert not bool(inputs.attention_mask.all()), "the batch must actually be left-padded"
    hf_logits, hf_language, hf_vision = qwen.hf_run(inputs)
    with torch.no_grad():
        logits, cache = qwen.model.run_with_cache(inputs)
    real = inputs.attention_mask.bool()
    assert max_diff(logits[real], hf_logits[real]) <= ATOL
    assert len(hf_language) == qwen.model.cfg.n_layers
    for i, hidden in enumerate(hf_language):
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"][real], hidden[real]) <= ATOL, f"language layer {i}"
    assert len(hf_vision) == qwen.model.vision.cfg.n_layers
    for i, rows in enumerate(hf_vision):
        ours = cache[f"vision.blocks.{i}.hook_resid_post"]
        assert ours.shape[0] == len(rows), "one row per image / video"
        for row, hidden in enumerate(rows):
            assert max_diff(ours[row, : hidden.shape[0]], hidden) <= ATOL, f"vision block {i}, row {row}"
    image = qwen.model.image_token_mask(inputs.input_ids)
    assert torch.equal(cache["hook_image_embed"][image], cache["hook_embed"][image]), "features at every placeholder"


def test_mm_token_type_ids_are_derived_when_missing(qwen):
    inputs = qwen.case("video")
    with torch.no_grad():
        expected = qwen.model(inputs)
        inputs.mm_token_type_ids = None
        assert torch.equal(qwen.model(inputs), expected)


def test_text_only_and_image_features(qwen):
    ids = qwen.tok([chat("What colour is a red square?")], return_tensors="pt")
    with torch.no_grad():
        assert max_diff(qwen.model(ids["input_ids"]), qwen.hf(**ids).logits) <= ATOL
        inputs = qwen.case("two_images")
        _, cache = qwen.model.run_with_cache(inputs, names_filter="hook_image_embed")
        features = qwen.model.image_features(inputs)
    assert torch.equal(features, cache["hook_image_embed"][qwen.model.image_token_mask(inputs.input_ids)])


def test_generate_equals_hf(qwen):
    """Greedy, and seeded sampling: a random tiny model repeats its greedy token, while sampled tokens vary,
    so every decode step's 3D positions and logits have to match HF's for the draws to agree."""
    for case in ("padded_batch", "video"):
        inputs = qwen.case(case)
        with torch.no_grad():
            expected = qwen.hf.generate(**inputs.as_kwargs(), max_new_tokens=8, do_sample=False)
        assert torch.equal(qwen.model.generate(inputs, max_new_tokens=8), expected), case
        for use_cache in (True, False):
            torch.manual_seed(11)
            expected = qwen.hf.generate(**inputs.as_kwargs(), max_new_tokens=8, do_sample=True)
            torch.manual_seed(11)
            tokens = qwen.model.generate(inputs, max_new_tokens=8, do_sample=True, use_past_kv_cache=use_cache)
            assert torch.equal(tokens, expected), (case, use_cache)
    assert len(expected[0, inputs.shape[1]:].unique()) > 2, "sampling must actually vary the tokens"


def test_vision_head_ablation_equals_hf_surgery(qwen):
    inputs, layer, head = qwen.case("two_images"), 1, 2
    d_head = qwen.model.vision.cfg.d_head

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        clean = qwen.model(inputs)
        ablated = qwen.model.run_with_hooks(inputs, fwd_hooks=[(f"vision.blocks.{layer}.attn.hook_z", ablate)])
        proj = qwen.hf.model.visual.blocks[layer].attn.proj
        saved = proj.weight[:, head * d_head : (head + 1) * d_head].clone()
        proj.weight[:, head * d_head : (head + 1) * d_head] = 0.0
        try:
            surgery = qwen.hf(**inputs.as_kwargs()).logits
        finally:
            proj.weight[:, head * d_head : (head + 1) * d_head] = saved
    assert max_diff(ablated, clean) > 1e-3, "ablating a vision head must change the output"
    assert max_diff(ablated, surgery) <= ATOL


def test_explicit_attention_matches_sdpa_and_respects_frames_and_windows(qwen):
    inputs = qwen.case("video")
    with torch.no_grad():
        fast = qwen.model(inputs)
        explicit, cache = qwen.model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    assert max_diff(fast, explicit) <= ATOL
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


VISION_BLOCK_HOOKS = [
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result", "mlp.hook_pre", "mlp.hook_post",
]


def test_vision_hook_contract_and_shapes(qwen):
    model, inputs = qwen.model, qwen.case("two_images")
    names = set(model.hook_dict)
    for i in range(model.vision.cfg.n_layers):
        for hook in VISION_BLOCK_HOOKS:
            assert f"vision.blocks.{i}.{hook}" in names
    for hook in ["vision.hook_embed", "projector.hook_in", "projector.ln.hook_scale", "projector.ln.hook_normalized",
                 "projector.mlp.hook_pre", "projector.mlp.hook_post", "projector.hook_out", "hook_embed",
                 "hook_image_embed", "hook_text_embed", "blocks.0.attn.hook_rot_q"]:
        assert hook in names
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(inputs)
    finally:
        model.set_use_attn_result(False)
    assert set(cache.keys()) == names, "every hook point fires"
    vcfg, longest = model.vision.cfg, 60  # 6x10 and 8x6 patch grids, padded to 60
    assert cache["vision.hook_embed"].shape == (2, longest, vcfg.d_model)
    assert cache["vision.blocks.0.attn.hook_q"].shape == (2, longest, vcfg.n_heads, vcfg.d_head)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (2, vcfg.n_heads, longest, longest)
    assert cache["vision.blocks.0.attn.hook_result"].shape == (2, longest, vcfg.n_heads, vcfg.d_model)
    assert cache["projector.hook_out"].shape == (2, longest // 4, model.cfg.d_model)
    pattern = cache["vision.blocks.0.attn.hook_pattern"][1]
    assert torch.all(pattern[:, :48, 48:] == 0), "real patches never attend to padding"


def test_from_hf_model_shares_fused_qkv_storage_and_weight_processing_keeps_probabilities(qwen):
    model = HookedVLM.from_hf_model(qwen.hf)
    qkv = qwen.hf.model.visual.blocks[0].attn.qkv.weight
    assert model.vision.blocks[0].attn.W_Q.data_ptr() == qkv.data_ptr()
    assert model.vision.blocks[0].attn._W_V.data_ptr() == qkv[2 * qkv.shape[1] :].data_ptr()
    inputs = qwen.case("two_images")
    with torch.no_grad():
        assert max_diff(model(inputs), qwen.model(inputs)) == 0.0
        reference = qwen.hf(**inputs.as_kwargs()).logits.softmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # center_writing_weights skips RMSNorm towers, with a warning
        processed = HookedVLM.from_hf_model(
            qwen.hf, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
        )
    assert processed.vision.blocks[0].ln1.w is None, "vision norms folded into q, k, v and the MLP"
    with torch.no_grad():
        assert max_diff(processed(inputs).softmax(-1), reference) <= ATOL


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


def test_bad_input_is_a_clear_error(qwen):
    model, inputs = qwen.model, qwen.case("two_images")
    grid = inputs.image_grid_thw
    cases = {
        "implies 92 patches": dict(image_grid_thw=torch.tensor([[1, 6, 10], [1, 8, 4]])),
        "runs of \\[15, 12\\] tokens but image_grid_thw gives \\[12, 15\\]": dict(image_grid_thw=grid.flip(0)),
        "no pixel_values were given": dict(pixel_values=None, image_grid_thw=None),
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
    text_only = qwen.tok(["hello"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="no <\\|image_pad\\|> token"):
        model(input_ids=text_only, pixel_values=inputs.pixel_values, image_grid_thw=grid)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_hf(checkpoints, variant, dtype):
    """As HF: vision queries / keys rotated in float32, HF's conv patchifier, and attention run once per image /
    frame / window (Qwen2.5-VL: in HF's window order) rather than masked over padded rows; half-precision logits
    are then HF's, for images of different sizes in one batch too."""
    warnings.simplefilter("ignore")
    model_cls = Qwen2VLForConditionalGeneration if variant == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    hf = model_cls.from_pretrained(checkpoints[variant], dtype=dtype).eval()
    ours = HookedVLM.from_pretrained(checkpoints[variant], dtype=dtype)
    inputs = ours.prepare(images=sample_images(2, seed=1, sizes=SIZES),
                          text=[chat(f"{VISION.format(IMAGE)}What colour?")] * 2, padding_side="left")
    with torch.no_grad():
        reference = hf(**inputs.as_kwargs()).logits.float()
        for model in (ours, HookedVLM.from_hf_model(hf)):
            got = model(inputs).float()
            assert (got - reference)[inputs.attention_mask.bool()].abs().max().item() <= 1e-4
