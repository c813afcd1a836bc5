"""Random small configurations of every family, for tests/test_random_configs.py.

A ``Draw`` is one HF config drawn from what the family accepts (head counts and widths, GQA ratios down to one
key/value head, tied or untied embeddings, biases, activations, feature layers, strategies, image, patch and
window sizes) and the inputs for it, built by hand without a tokenizer: a padded batch of two prompts with
the right number of image placeholders, random pixel values and grids. Weights are HF's random init plus the
norm / bias noise of tl_vlm.zoo (HF's 1 / 0 init would hide a dropped norm weight or bias).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    OPTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    T5Config,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from tl_vlm import VLMInputs

VOCAB = 96
PAD, BOS, IMAGE, VIDEO, VISION_START, VISION_END = range(6)  # special ids; text is drawn from the rest
INIT_RANGE = 0.08
VECTOR_NOISE = 0.1  # as tl_vlm.zoo: norm gains and biases away from HF's 1 / 0 init


@dataclass
class Draw:
    """One random configuration: ``entry`` is the conformance registry entry with the same HF layout (its
    ``hf_layers`` / ``align`` read HF's per-block outputs)."""

    entry: str
    label: str
    seed: int
    hf_class: type
    config: PreTrainedConfig
    make_inputs: Callable[[PreTrainedModel, random.Random], VLMInputs]

    def build(self) -> PreTrainedModel:
        torch.manual_seed(self.seed)
        model = self.hf_class(self.config)
        with torch.no_grad():
            if hasattr(model, "query_tokens"):  # BLIP-2 initialises them to zeros; trained ones are not
                model.query_tokens.normal_(0.0, 1.0)
            if not getattr(self.config.get_text_config(), "scale_decoder_outputs", True):
                # An untied Flan-T5 head: T5Config ties it anyway, and loading unties it when the file holds another.
                lm = model.language_model
                lm.lm_head.weight = torch.nn.Parameter(torch.randn_like(lm.shared.weight) * INIT_RANGE * 10)
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * VECTOR_NOISE)
        return model.eval()

    def inputs(self, model: PreTrainedModel) -> VLMInputs:
        return self.make_inputs(model, random.Random(self.seed))


# ------------------------------------------------------------------------------------------ prompts


def text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VISION_END + 1, VOCAB) for _ in range(n)]


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a batch padded on ``side`` (rows must differ in length)."""
    width = max(map(len, rows))
    assert len({len(r) for r in rows}) > 1, "the batch must be padded"
    ids, mask = [], []
    for row in rows:
        pad = [PAD] * (width - len(row))
        ids.append(pad + row if side == "left" else row + pad)
        mask.append([0] * len(pad) + [1] * len(row) if side == "left" else [1] * len(row) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


def prompts(rng: random.Random, placeholders: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, each BOS, text, its placeholders, text."""
    rows = [[BOS, *text(rng, 2 + 3 * i), *ph, *text(rng, 3 + i)] for i, ph in enumerate(placeholders)]
    return padded(rows, side)


# --------------------------------------------------------------------------------------------- towers


def lm_config(rng: random.Random, kind: str) -> PreTrainedConfig:
    """A small Llama / Mistral / Qwen2 / OPT / T5 language model."""
    heads = rng.choice([2, 4])
    d_head = rng.choice([8, 16])
    width = heads * d_head
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=VOCAB - 1)
    tie = rng.random() < 0.5
    if kind == "opt":
        return OPTConfig(**common, hidden_size=width, ffn_dim=2 * width, num_hidden_layers=2, num_attention_heads=heads,
                         max_position_embeddings=64, word_embed_proj_dim=width, activation_function="relu",
                         do_layer_norm_before=True, tie_word_embeddings=True, init_std=INIT_RANGE)
    if kind == "t5":
        return T5Config(**common, d_model=width, d_kv=d_head, d_ff=2 * width, num_layers=2, num_decoder_layers=2,
                        num_heads=heads, relative_attention_num_buckets=rng.choice([8, 32]),
                        relative_attention_max_distance=rng.choice([16, 128]), feed_forward_proj="gated-gelu",
                        layer_norm_epsilon=1e-6, tie_word_embeddings=tie, decoder_start_token_id=PAD)
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0 and h <= heads])
    lm = dict(common, hidden_size=width, intermediate_size=rng.choice([2, 3]) * width, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=d_head, hidden_act="silu",
              max_position_embeddings=128, initializer_range=INIT_RANGE, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": rng.choice([1e4, 1e6])},
              rms_norm_eps=rng.choice([1e-5, 1e-6]))
    if kind == "llama":
        return LlamaConfig(**lm, attention_bias=rng.random() < 0.5)
    if kind == "mistral":
        return MistralConfig(**lm, sliding_window=None)
    return Qwen2Config(**lm, use_sliding_window=False)  # q / k / v biases


def vit_config(rng: random.Random, kind: str) -> PreTrainedConfig:
    """A CLIP or SigLIP tower: heads, width, depth, image / patch size and activation drawn."""
    heads = rng.choice([1, 2, 4])
    width = heads * rng.choice([8, 16])
    patch = rng.choice([4, 6, 8])
    common = dict(hidden_size=width, intermediate_size=rng.choice([2, 4]) * width, num_hidden_layers=rng.choice([2, 3]),
                  num_attention_heads=heads, patch_size=patch, image_size=patch * rng.choice([2, 3, 4]),
                  initializer_range=INIT_RANGE)
    if kind == "clip":
        return CLIPVisionConfig(**common, hidden_act=rng.choice(["quick_gelu", "gelu"]), layer_norm_eps=1e-5,
                                projection_dim=width)
    return SiglipVisionConfig(**common, hidden_act=rng.choice(["gelu_pytorch_tanh", "gelu"]), layer_norm_eps=1e-6)


# ---------------------------------------------------------------------------------------------- LLaVA


def llava_fields(rng: random.Random, vision: PreTrainedConfig, lm: PreTrainedConfig, strategy: str) -> dict:
    return dict(vision_config=vision, text_config=lm, image_token_index=IMAGE, vision_feature_select_strategy=strategy,
                vision_feature_layer=rng.choice([-1, -2, [-3, -1], [-2, -1], [0, -1]]),
                projector_hidden_act=rng.choice(["gelu", "silu"]), multimodal_projector_bias=rng.random() < 0.5,
                tie_word_embeddings=lm.tie_word_embeddings)


def draw_llava(seed: int, i: int) -> Draw:
    rng = random.Random(seed)
    tower, lm_kind, strategy = ("clip", "siglip")[i % 2], ("llama", "mistral", "qwen2")[i % 3], rng.choice(["default", "full"])
    vision = vit_config(rng, tower)
    n_features = (vision.image_size // vision.patch_size) ** 2 + (tower == "clip") - (strategy == "default")
    config = LlavaConfig(**llava_fields(rng, vision, lm_config(rng, lm_kind), strategy), image_seq_length=n_features)

    def make_inputs(model, rng):
        ids, mask = prompts(rng, [[IMAGE] * n_features] * 2, rng.choice(["left", "right"]))
        return VLMInputs(ids, torch.randn(2, 3, vision.image_size, vision.image_size), mask)

    label = f"llava-{tower}-{lm_kind}-{strategy}-{config.vision_feature_layer}-kv{config.text_config.num_key_value_heads}"
    return Draw("llava15", label, seed, LlavaForConditionalGeneration, config, make_inputs)


def draw_llava_next(seed: int, i: int) -> Draw:
    rng = random.Random(seed)
    lm_kind = ("mistral", "qwen2", "llama")[i % 3]
    vision = vit_config(rng, "clip")
    size = vision.image_size
    pinpoints = rng.sample([[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [size, 3 * size], [3 * size, size]], 3)
    config = LlavaNextConfig(**llava_fields(rng, vision, lm_config(rng, lm_kind), "default"), image_grid_pinpoints=pinpoints)

    def make_inputs(model, rng):
        sizes = torch.tensor([[rng.randrange(size // 2, 3 * size), rng.randrange(size // 2, 3 * size)] for _ in range(2)])
        tiles = [image_size_to_num_patches(s, pinpoints, size) for s in sizes.tolist()]
        pixels = torch.randn(2, max(tiles), 3, size, size)
        with torch.no_grad():  # the anyres / unpadding token count, as HF's processor computes it
            features = model.model.get_image_features(pixels, sizes).pooler_output
        ids, mask = prompts(rng, [[IMAGE] * len(f) for f in features], rng.choice(["left", "right"]))
        return VLMInputs(ids, pixels, mask, image_sizes=sizes)

    label = f"next-{lm_kind}-{config.vision_feature_layer}-kv{config.text_config.num_key_value_heads}"
    return Draw("llava_next_mistral", label, seed, LlavaNextForConditionalGeneration, config, make_inputs)


# -------------------------------------------------------------------------------------------- Qwen-VL


def draw_qwen(seed: int, i: int, variant: str) -> Draw:
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    d_head = rng.choice([8, 16])
    width = heads * d_head
    text_config = dict(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=rng.choice([h for h in (1, 2) if heads % h == 0]), hidden_act="silu",
        max_position_embeddings=256, rms_norm_eps=1e-6, use_sliding_window=False, initializer_range=INIT_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": {8: [1, 1, 2], 16: rng.choice([[2, 3, 3], [4, 2, 2]])}[d_head]},
        bos_token_id=None, eos_token_id=VOCAB - 1, pad_token_id=PAD,
    )
    v_heads = rng.choice([1, 2, 4])
    v_width = v_heads * rng.choice([8, 16])
    patch = rng.choice([2, 4])
    common = dict(num_heads=v_heads, in_channels=3, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  depth=rng.choice([2, 3, 4]), initializer_range=INIT_RANGE)
    if variant == "qwen2_vl":
        vision = dict(common, embed_dim=v_width, hidden_size=width, mlp_ratio=rng.choice([2, 4]),
                      hidden_act=rng.choice(["quick_gelu", "gelu"]))
        config_class, hf_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(common, hidden_size=v_width, intermediate_size=rng.choice([2, 3]) * v_width, out_hidden_size=width,
                      hidden_act="silu", window_size=patch * 2 * rng.choice([1, 2]), tokens_per_second=rng.choice([1, 2]),
                      fullatt_block_indexes=sorted(rng.sample(range(common["depth"]), rng.choice([0, 1, 2]))))
        config_class, hf_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text_config, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                          tie_word_embeddings=rng.random() < 0.5)

    def make_inputs(model, rng):
        """Two images of different sizes (one per prompt) and a video in the second prompt."""
        row = 3 * 2 * patch * patch
        grids = [[1, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)] for _ in range(2)]
        while grids[1] == grids[0]:
            grids[1] = [1, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)]
        video = [rng.choice([1, 2]), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)]

        def run(token, grid):
            return [VISION_START, *[token] * (grid[0] * grid[1] * grid[2] // 4), VISION_END]

        ids, mask = prompts(rng, [run(IMAGE, grids[0]), run(IMAGE, grids[1]) + text(rng, 2) + run(VIDEO, video)],
                            rng.choice(["left", "right"]))
        inputs = VLMInputs(
            ids, torch.randn(sum(t * h * w for t, h, w in grids), row), mask, image_grid_thw=torch.tensor(grids),
            pixel_values_videos=torch.randn(video[0] * video[1] * video[2], row), video_grid_thw=torch.tensor([video]),
            mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
        )
        if variant == "qwen2_5_vl":
            inputs.second_per_grid_ts = torch.tensor([rng.choice([0.5, 1.0, 2.0])])
        return inputs

    tied = "tied" if config.tie_word_embeddings else "untied"
    label = f"{variant}-depth{common['depth']}-h{v_heads}-kv{text_config['num_key_value_heads']}-{tied}"
    if variant == "qwen2_5_vl":
        label += f"-win{vision['window_size']}-full{vision['fullatt_block_indexes']}"
    return Draw(variant, label, seed, hf_class, config, make_inputs)


# ---------------------------------------------------------------------------------- BLIP-2, InstructBLIP


def draw_blip2(seed: int, i: int, instruct: bool) -> Draw:
    rng = random.Random(seed)
    lm_kind = (("llama", "t5") if instruct else ("opt", "t5"))[i % 2]
    heads = rng.choice([1, 2, 4])
    patch = rng.choice([4, 6])
    vision = dict(hidden_size=heads * rng.choice([8, 16]), num_attention_heads=heads, num_hidden_layers=2,
                  intermediate_size=64, patch_size=patch, image_size=patch * rng.choice([2, 3]), hidden_act="gelu",
                  layer_norm_eps=1e-6, qkv_bias=True, initializer_range=INIT_RANGE)
    q_heads = rng.choice([2, 4])
    qformer = dict(hidden_size=q_heads * rng.choice([8, 16]), num_attention_heads=q_heads, num_hidden_layers=rng.choice([2, 3]),
                   intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=64,
                   cross_attention_frequency=rng.choice([1, 2]), initializer_range=INIT_RANGE)
    if instruct:
        qformer.update(vocab_size=VOCAB, pad_token_id=PAD)
    n_queries = rng.choice([4, 8])
    config = (InstructBlipConfig if instruct else Blip2Config)(
        vision_config=vision, qformer_config=qformer, text_config=lm_config(rng, lm_kind), num_query_tokens=n_queries,
        image_token_index=IMAGE, initializer_range=INIT_RANGE,
    )

    def make_inputs(model, rng):
        # As the BLIP-2 processors: the image's query placeholders first, then the (BOS-led) prompt; left padding.
        rows = [[IMAGE] * n_queries + [BOS, *text(rng, 3 + 2 * i)] for i in range(2)]
        ids, mask = padded(rows, "left")
        inputs = VLMInputs(ids, torch.randn(2, 3, vision["image_size"], vision["image_size"]), mask)
        if instruct:  # the instruction for the Q-Former, right-padded as BERT tokenizers pad
            inputs.qformer_input_ids, inputs.qformer_attention_mask = padded([text(rng, 4), text(rng, 6)], "right")
        if lm_kind == "t5":
            inputs.decoder_input_ids = torch.tensor([[PAD, *text(rng, 3)] for _ in range(2)])
        return inputs

    kind = "instructblip" if instruct else "blip2"
    label = f"{kind}-{lm_kind}-h{heads}-q{n_queries}-xattn{qformer['cross_attention_frequency']}"
    if lm_kind == "t5":
        label += "-untied" if not config.text_config.scale_decoder_outputs else "-tied"
    entry = {(False, "opt"): "blip2_opt", (False, "t5"): "blip2_flan_t5", (True, "llama"): "instructblip_vicuna",
             (True, "t5"): "instructblip_flan_t5"}[instruct, lm_kind]
    return Draw(entry, label, seed, InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration,
                config, make_inputs)


# --------------------------------------------------------------------------------------------- Mllama


def draw_mllama(seed: int, i: int) -> Draw:
    """Tiles (2 or 4 per image, their aspect ratios), tile / patch sizes, local / global depths, intermediate layers,
    GQA, cross-attention layers anywhere (the first and last layers included) and rope kind drawn; one prompt has
    text before its image, the other sometimes two images (else an empty image slot is not drawn)."""
    rng = random.Random(seed)
    heads, d_head = rng.choice([2, 4]), rng.choice([8, 16])
    v_heads = rng.choice([1, 2, 4])
    v_width = v_heads * rng.choice([8, 16])
    patch, n_local, n_tiles = rng.choice([4, 6]), rng.choice([2, 3]), (2, 4)[i % 2]
    ratios = None if n_tiles == 4 else [[1, 1], [1, 2], [2, 1]]
    intermediate = sorted(rng.sample(range(n_local), rng.choice([1, 2])))
    vision = dict(hidden_size=v_width, intermediate_size=2 * v_width, attention_heads=v_heads,
                  num_hidden_layers=n_local, num_global_layers=rng.choice([1, 2]), intermediate_layers_indices=intermediate,
                  vision_output_dim=v_width * (1 + len(intermediate)), image_size=patch * rng.choice([2, 3]),
                  patch_size=patch, max_num_tiles=n_tiles, supported_aspect_ratios=ratios,
                  hidden_act=rng.choice(["gelu", "gelu_new"]), norm_eps=rng.choice([1e-5, 1e-6]), initializer_range=INIT_RANGE)
    n_layers = rng.choice([3, 4])
    rope = rng.choice([{"rope_type": "default", "rope_theta": 1e4},
                       {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
    text_config = dict(vocab_size=VOCAB, hidden_size=heads * d_head, intermediate_size=2 * heads * d_head,
                       num_hidden_layers=n_layers, num_attention_heads=heads,
                       num_key_value_heads=rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
                       cross_attention_layers=sorted(rng.sample(range(n_layers), rng.choice([1, 2]))),
                       hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=128, rope_parameters=rope,
                       initializer_range=INIT_RANGE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=VOCAB - 1)
    config = MllamaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE)
    supported = config.vision_config.supported_aspect_ratios

    def make_inputs(model, rng):
        per_row = [1, rng.choice([1, 2])]
        rows = [[BOS, IMAGE, *text(rng, 4)], [BOS, *text(rng, 3), *[IMAGE, *text(rng, 2)] * per_row[1]]]
        ids, mask = padded(rows, rng.choice(["left", "right"]))
        n_images, size = max(per_row), config.vision_config.image_size
        ratio_ids = torch.zeros(2, n_images, dtype=torch.long)
        tiles = torch.zeros(2, n_images, n_tiles, dtype=torch.long)
        tiles[..., 0] = 1  # an empty slot has its first tile marked, as HF's processor does
        n_real = [[0] * n_images for _ in range(2)]
        for b, n in enumerate(per_row):
            for j in range(n):
                ratio_ids[b, j] = rng.randrange(1, len(supported) + 1)
                n_real[b][j] = supported[ratio_ids[b, j] - 1][0] * supported[ratio_ids[b, j] - 1][1]
                tiles[b, j, : n_real[b][j]] = 1
        sparse = [get_cross_attention_token_mask(row.tolist(), IMAGE) for row in ids]
        cross = convert_sparse_cross_attention_mask_to_dense(sparse, n_real, n_tiles, ids.shape[1])
        return VLMInputs(ids, torch.randn(2, n_images, n_tiles, 3, size, size), mask, aspect_ratio_ids=ratio_ids,
                         aspect_ratio_mask=tiles, cross_attention_mask=torch.from_numpy(cross))

    label = (f"mllama-tiles{n_tiles}-cross{text_config['cross_attention_layers']}-of{n_layers}"
             f"-inter{intermediate}-kv{text_config['num_key_value_heads']}-{rope['rope_type']}")
    return Draw("mllama", label, seed, MllamaForConditionalGeneration, config, make_inputs)


# (seed, i) -> the family's i-th draw; its main categorical choices (tower, language model) cycle with i, so a
# handful of draws covers each of them.
DRAWERS: dict[str, Callable[[int, int], Draw]] = {
    "llava": draw_llava,
    "llava_next": draw_llava_next,
    "qwen2_vl": lambda seed, i: draw_qwen(seed, i, "qwen2_vl"),
    "qwen2_5_vl": lambda seed, i: draw_qwen(seed, i, "qwen2_5_vl"),
    "blip2": lambda seed, i: draw_blip2(seed, i, instruct=False),
    "instructblip": lambda seed, i: draw_blip2(seed, i, instruct=True),
    "mllama": draw_mllama,
}


def draws(per_family: dict[str, int], seed: int) -> list[Draw]:
    """``per_family[f]`` draws of each family, seeded from ``seed`` (same draws every run)."""
    rng = random.Random(seed)
    return [DRAWERS[family](rng.randrange(2**31), i) for family, n in per_family.items() for i in range(n)]
