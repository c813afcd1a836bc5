"""The fixture registry: one entry per architecture / variant; the contract tests run over all of them.

An entry says how to build its tiny saved checkpoint (``tl_vlm.zoo`` builder + variant), which HF class is
the reference, how to make its standard inputs (``cases``: ``"batch"`` is always a padded batch of two
prompts with images; a family adds its own cases such as Qwen's video), which HF modules give each tower's
per-layer outputs, and which HF linear layer a head ablation edits in every attention of every tower.
Adding a family = adding one ``Entry`` to ``REGISTRY`` (and, if its HF layout is new, its small helpers here).

Everything here uses the public model API (``prepare``, ``capabilities``, ``towers``, hook names, and the
family methods ``image_features`` / ``image_token_cells``); HF's side is read independently of tl_vlm's
``hf_layers`` / ``align_hf_outputs``, so the reference does not trust the code under test.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Idefics3ForConditionalGeneration,
    Gemma3ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    MllamaForConditionalGeneration,
    Mistral3ForConditionalGeneration,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    SmolVLMForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

from tl_vlm import VLMInputs
from tl_vlm.zoo.tiny import build_tiny_vlm
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_blip2 import build_tiny_blip2
from tl_vlm.zoo.tiny_idefics3 import build_tiny_idefics3
from tl_vlm.zoo.tiny_idefics3 import chat as idefics3_chat
from tl_vlm.zoo.tiny_internvl import build_tiny_internvl
from tl_vlm.zoo.tiny_internvl import chat as internvl_chat
from tl_vlm.zoo.tiny_mllama import build_tiny_mllama
from tl_vlm.zoo.tiny_gemma import build_tiny_gemma
from tl_vlm.zoo.tiny_onevision import build_tiny_onevision, chat
from tl_vlm.zoo.tiny_pixtral import build_tiny_pixtral
from tl_vlm.zoo.tiny_pixtral import chat as pixtral_chat
from tl_vlm.zoo.tiny_qwen_vl import build_tiny_qwen_vl
from tl_vlm.zoo.tiny_qwen3_vl import build_tiny_qwen3_vl

ATOL = 1e-4

# ---------------------------------------------------------------------------------------------- inputs

LLAVA_PROMPTS = [
    "USER: <image>\nWhat is the colour? ASSISTANT:",
    "USER: <image>\nDescribe the shape in the image please. ASSISTANT:",
]
LLAVA_TEXT = "USER: What is the colour of a red square? ASSISTANT:"
NON_SQUARE = [(60, 30), (30, 75)]  # (w, h): exercises LLaVA-NeXT's anyres tiling, unpadding and image_newline

BLIP2_PROMPTS = ["Question: what is the colour? Answer:", "Question: describe the shape in the image please. Answer:"]
T5_DECODER_IDS = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])  # column 0 becomes the decoder start token

QWEN_IMAGE, QWEN_VIDEO = "<|image_pad|>", "<|video_pad|>"
QWEN_VISION = "<|vision_start|>{}<|vision_end|>"
QWEN_SIZES = [(40, 24), (24, 32)]  # (w, h): 6x10 and 8x6 patch grids, 15 and 12 tokens


def qwen_chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def llava_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    sizes = NON_SQUARE if entry.name == "llava_next_mistral" else None
    images = sample_images(2, seed=1, sizes=sizes)
    return {
        "batch": model.prepare(images=images, text=LLAVA_PROMPTS, padding_side="left"),
        "batch_right": model.prepare(images=images, text=LLAVA_PROMPTS, padding_side="right"),
        "text": VLMInputs(**dict(model.tokenizer([LLAVA_TEXT], return_tensors="pt"))),
    }


ONEVISION_SIZES = [(50, 40), (100, 90)]  # (w, h): a 2x2 tile canvas, and a 3x4 one that anyres_max shrinks
ONEVISION_PROMPTS = [chat("<image>\nWhat is the colour?"), chat("<image>\nDescribe the shape in the image please.")]


def onevision_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    images = sample_images(2, seed=1, sizes=ONEVISION_SIZES)
    a, b, c = sample_images(3, seed=3, sizes=[(40, 60), (50, 50), (70, 40)])
    frames = sample_images(3, seed=5, sizes=[(40, 40)] * 3)
    still = sample_images(1, seed=7, sizes=[(60, 40)])
    return {
        "batch": model.prepare(images=images, text=ONEVISION_PROMPTS, padding_side="left"),
        "batch_right": model.prepare(images=images, text=ONEVISION_PROMPTS, padding_side="right"),
        # two images in one prompt (one tile each), one in the other (tiled): batch_num_images [2, 1]
        "multi_image": model.prepare(images=[[a, b], [c]], text=[chat("<image><image>\nWhich one is red?"),
                                                                chat("<image>\nWhat is the colour?")]),
        "video": VLMInputs.from_mapping(model.processor(videos=[frames], text=chat("<video>\nWhat moves?"))),
        "video_and_image": VLMInputs.from_mapping(
            model.processor(images=still, videos=[frames], text=chat("<image><video>\nWhat moves?"))
        ),
        "text": VLMInputs(**dict(model.tokenizer([chat("What is the colour of a red square?")], return_tensors="pt"))),
    }


def blip2_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    batch = model.prepare(images=sample_images(2, seed=3), text=BLIP2_PROMPTS)
    if model.capabilities.encoder_decoder:  # Flan-T5's forward needs decoder ids (generate makes its own)
        decoder_ids = T5_DECODER_IDS.clone()
        decoder_ids[:, 0] = model.generation_config.decoder_start_token_id
        batch = dataclasses.replace(batch, decoder_input_ids=decoder_ids)
    return {"batch": batch}


class QwenPrepare:
    """What HF's Qwen2-VL processor does, without torchvision (its video processor needs it): the image
    processor cuts the images, each ``<|image_pad|>`` / ``<|video_pad|>`` is expanded to its token count and
    ``mm_token_type_ids`` marks them. Videos are frames in the image processor's layout."""

    def __init__(self, path, variant: str):
        self.variant = variant
        self.tok = AutoTokenizer.from_pretrained(path)
        self.images = AutoImageProcessor.from_pretrained(path)
        self.merge = self.images.merge_size

    def __call__(self, texts: list[str], images=None, video=None) -> VLMInputs:
        batch = {}
        counts = {QWEN_IMAGE: [], QWEN_VIDEO: []}
        if images is not None:
            batch.update(self.images(images=images, return_tensors="pt"))
            counts[QWEN_IMAGE] = (batch["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        if video is not None:
            batch["pixel_values_videos"], batch["video_grid_thw"] = self.video(video)
            counts[QWEN_VIDEO] = (batch["video_grid_thw"].prod(-1) // self.merge**2).tolist()
            if self.variant == "qwen2_5_vl":
                batch["second_per_grid_ts"] = torch.tensor([0.5])  # 2 frames per temporal patch at 4 fps
        expanded = []
        for text in texts:
            for token, n in counts.items():
                if not n:  # no such inputs (or already expanded: Qwen3Prepare's video frames)
                    continue
                parts = text.split(token)
                text = parts[0] + "".join(token * n.pop(0) + rest for rest in parts[1:])
            expanded.append(text)
        tokens = self.tok(expanded, return_tensors="pt", padding=True)
        ids = tokens["input_ids"]
        image_id, video_id = self.tok.convert_tokens_to_ids([QWEN_IMAGE, QWEN_VIDEO])
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


def qwen_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    return qwen_family_cases(QwenPrepare(entry.path, entry.name))


def qwen_family_cases(prepare: QwenPrepare) -> dict[str, VLMInputs]:
    """Qwen2-VL's and Qwen3-VL's cases, each written by its ``prepare``."""
    images = sample_images(2, seed=1, sizes=QWEN_SIZES)
    image = QWEN_VISION.format(QWEN_IMAGE)
    frames = sample_images(4, seed=2, sizes=[(24, 16)] * 4)  # 2 temporal patches of a 4x6 patch grid
    return {
        "batch": prepare(  # left-padded, images of different sizes
            [qwen_chat(f"{image}What colour?"),
             qwen_chat(f"Describe the shape in this picture please: {image} is it a square or a circle")],
            images,
        ),
        "two_images": prepare([qwen_chat(f"{image}What colour? {image}Which shape?")], images),
        "video": prepare([qwen_chat(f"{QWEN_VISION.format(QWEN_VIDEO)}What moves? Like {image}?")], images[:1], frames),
        "text": VLMInputs(**dict(prepare.tok([qwen_chat("What colour is a red square?")], return_tensors="pt"))),
    }


MLLAMA_PROMPTS = ["<|image|>What is the colour?", "Describe the shape in the image please <|image|> is it a square"]
MLLAMA_SIZES = [(60, 30), (30, 75)]  # (w, h): 2 of 4 tiles (aspect ratio 1x2), and 3 of 4 (3x1)


def mllama_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    """The second prompt has text before its image (rows that may see no image: HF's full-text-row masking);
    ``multi_image`` has two images in one prompt and one in the other (an empty image slot, aspect ratio id 0)."""
    a, b = sample_images(2, seed=1, sizes=MLLAMA_SIZES)
    c = sample_images(1, seed=3, sizes=[(50, 50)])[0]
    return {
        "batch": model.prepare(images=[[a], [b]], text=MLLAMA_PROMPTS, padding_side="left"),
        "batch_right": model.prepare(images=[[a], [b]], text=MLLAMA_PROMPTS, padding_side="right"),
        "multi_image": model.prepare(images=[[a, c], [b]], text=["<|image|>Which one <|image|> is red?",
                                                                 "<|image|>What is the colour?"]),
    }


class Qwen3Prepare(QwenPrepare):
    """As ``QwenPrepare``, but a video is written as Qwen3-VL's processor writes it: per temporal patch
    ``<t seconds>`` + ``<|vision_start|>`` + its ``<|video_pad|>`` run + ``<|vision_end|>``, with the timestamps
    HF's ``Qwen3VLProcessor`` computes for frames sampled at ``FPS``."""

    FPS = 2.0

    def __call__(self, texts: list[str], images=None, video=None) -> VLMInputs:
        if video is None:
            return super().__call__(texts, images)
        from transformers import Qwen3VLProcessor

        pixels, grid = self.video(video)
        _, h, w = grid[0].tolist()
        stamps = Qwen3VLProcessor._calculate_timestamps(None, list(range(len(video))), self.FPS, self.images.temporal_patch_size)
        frames = "".join(f"<{s:.1f} seconds>" + QWEN_VISION.format(QWEN_VIDEO * (h * w // self.merge**2)) for s in stamps)
        inputs = super().__call__([t.replace(QWEN_VISION.format(QWEN_VIDEO), frames) for t in texts], images)
        return dataclasses.replace(inputs, pixel_values_videos=pixels, video_grid_thw=grid)


def qwen3_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    return qwen_family_cases(Qwen3Prepare(entry.path, entry.name))


# (w, h): 5x8 and 7x4 (rows x cols) patch grids for Pixtral after resizing to whole patches, 6x8 and 8x4 patches (3x4
# and 4x2 merged tokens) for Mistral3: padded vision rows, one image per prompt or both in one prompt.
PIXTRAL_SIZES = [(40, 24), (16, 28)]


def pixtral_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    images = sample_images(2, seed=1, sizes=PIXTRAL_SIZES)
    prompts = [pixtral_chat("[IMG]What is the colour?"), pixtral_chat("Describe the shape in [IMG] please")]
    return {
        "batch": model.prepare(images=images, text=prompts, padding_side="left"),
        "batch_right": model.prepare(images=images, text=prompts, padding_side="right"),
        "multi_image": model.prepare(images=[images], text=[pixtral_chat("[IMG]What colour? [IMG]Which shape?")]),
        "text": VLMInputs(**dict(model.tokenizer([pixtral_chat("What is the colour of a red square?")], return_tensors="pt"))),
    }


INTERNVL_SIZES = [(60, 30), (20, 20)]  # (w, h): 2x1 crops + thumbnail, and one tile
INTERNVL_PROMPTS = [internvl_chat("<IMG_CONTEXT>\nWhat is the colour?"),
                    internvl_chat("Describe <IMG_CONTEXT>\n the shape in the image please.")]


def internvl_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    images = sample_images(2, seed=1, sizes=INTERNVL_SIZES)
    a, b = sample_images(2, seed=3, sizes=[(30, 70), (50, 50)])  # 1x2 crops + thumbnail; 2x2 crops + thumbnail
    return {
        "batch": model.prepare(images=images, text=INTERNVL_PROMPTS),
        "multi_image": model.prepare(images=[a, b], text=[internvl_chat("<IMG_CONTEXT>\n<IMG_CONTEXT>\nWhich one is red?")]),
        "text": VLMInputs(**dict(model.tokenizer([internvl_chat("What is the colour of a red square?")], return_tensors="pt"))),
    }


IDEFICS3_PROMPTS = [idefics3_chat("<image>What is the colour?"), idefics3_chat("Describe <image> the shape in the image please.")]


def idefics3_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    """Row 0 has 3 sub-images (2x1 + global) and 2 all-zero padding slots, row 1 has 5 (2x2 + global); "padded":
    the batch with the bottom-right of row 1's first sub-image padded as the processor pads (zero pixels, mask 0)."""
    batch = model.prepare(images=sample_images(2, seed=1, sizes=INTERNVL_SIZES), text=IDEFICS3_PROMPTS)
    pixels, mask = batch.pixel_values.clone(), batch.pixel_attention_mask.clone()
    pixels[1, 0, :, 10:, 7:], mask[1, 0, 10:, 7:] = 0, 0
    cases = {"batch": batch, "padded": dataclasses.replace(batch, pixel_values=pixels, pixel_attention_mask=mask),
             "text": VLMInputs(**dict(model.tokenizer([idefics3_chat("What colour is a red square?")], return_tensors="pt")))}
    return {name: cases[name] for name in entry.cases}


GEMMA3_PROMPTS = ["user <start_of_image> What is the colour? model",
                  "user Describe the shape <start_of_image> in the image please model"]
PALIGEMMA_PROMPTS = ["<image>What is the colour?", "<image>Describe the shape in the image please"]


def gemma_cases(model, entry: Entry) -> dict[str, VLMInputs]:
    """Gemma 3: a padded batch (each side), two images in one prompt (two bidirectional blocks), text. PaliGemma: a
    padded batch (each side), a batch with suffixes (causal after the prefix), text with an all-prefix
    ``token_type_ids`` (what the processor gives a prompt without suffix)."""
    images = sample_images(2, seed=1)
    if entry.name == "gemma3":
        a, b, c = sample_images(3, seed=3, sizes=[(40, 60), (50, 50), (70, 40)])
        text = "user What is the colour of a red square? model"
        return {
            "batch": model.prepare(images=images, text=GEMMA3_PROMPTS, padding_side="left"),
            "batch_right": model.prepare(images=images, text=GEMMA3_PROMPTS, padding_side="right"),
            "multi_image": model.prepare(images=[[a, b], [c]], text=["user <start_of_image> <start_of_image> Which one is red? model",
                                                                     "user <start_of_image> What is the colour? model"]),
            "text": VLMInputs(**dict(model.tokenizer([text], return_tensors="pt"))),
        }
    tokens = model.tokenizer(["What is the colour of a red square?\n"], return_tensors="pt")
    return {
        "batch": model.prepare(images=images, text=PALIGEMMA_PROMPTS, padding_side="left"),
        "batch_right": model.prepare(images=images, text=PALIGEMMA_PROMPTS, padding_side="right"),
        "suffix": model.prepare(images=images, text=PALIGEMMA_PROMPTS, suffix=["red", "a blue circle"], padding_side="left"),
        "text": VLMInputs(**dict(tokens), token_type_ids=torch.zeros_like(tokens["input_ids"])),
    }


def single_inputs(model, entry: Entry, seed: int) -> VLMInputs:
    """One prompt with one image (seeded): clean and corrupted runs differ only in the image."""
    from tl_vlm.prompts import format_prompt  # tl_vlm.prompts.format_prompt after the refactor

    sizes = {"llava_next_mistral": [NON_SQUARE[0]], "qwen2_vl": [(40, 28)], "qwen2_5_vl": [(40, 28)],
             "qwen3_vl": [(24, 24)], "qwen3_vl_moe": [(24, 24)], "pixtral": [(16, 12)], "mistral3": [(16, 12)],
             # few tiles keep the prompt (and the per-position patching loops) short
             "internvl3": [(20, 20)], "idefics3": [(60, 30)], "smolvlm": [(60, 30)]}.get(entry.name)
    inputs = model.prepare(images=sample_images(1, seed=seed, sizes=sizes),
                           text=format_prompt(model.processor, "What colour is the shape?"))
    if model.capabilities.encoder_decoder:
        decoder_ids = T5_DECODER_IDS[:1].clone()
        decoder_ids[:, 0] = model.generation_config.decoder_start_token_id
        inputs = dataclasses.replace(inputs, decoder_input_ids=decoder_ids)
    return inputs


# ------------------------------------------------------------------------------- HF per-layer outputs


def llava_hf_layers(hf) -> dict[str, list[nn.Module]]:
    return {"language": list(hf.model.language_model.layers), "vision": list(hf.model.vision_tower.encoder.layers)}


def blip2_hf_layers(hf) -> dict[str, list[nn.Module]]:
    lm = hf.language_model
    layers = {"vision": list(hf.vision_model.encoder.layers), "qformer": list(hf.qformer.encoder.layer)}
    if hasattr(lm, "encoder"):  # Flan-T5
        return {**layers, "encoder": list(lm.encoder.block), "decoder": list(lm.decoder.block)}
    inner = lm.model
    return {**layers, "language": list(inner.decoder.layers if hasattr(inner, "decoder") else inner.layers)}


def qwen_hf_layers(hf) -> dict[str, list[nn.Module]]:
    return {"language": list(hf.model.language_model.layers), "vision": list(hf.model.visual.blocks)}


def qwen_align(entry: Entry, hf, tower: str, outputs: list[torch.Tensor], inputs: VLMInputs):
    """HF's Qwen vision runs images, then videos, each as one packed sequence (Qwen2.5-VL: in window order);
    per layer this returns one [patch, d] tensor per image / video, tl_vlm's rows."""
    if tower != "vision":
        return outputs
    merge = hf.config.vision_config.spatial_merge_size
    depth = len(hf.model.visual.blocks)
    runs = [grid for grid in (inputs.image_grid_thw, inputs.video_grid_thw) if grid is not None]

    def unpack(packed: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        vc = hf.config.vision_config
        if entry.name == "qwen2_5_vl":
            order, _ = get_vision_window_index(grid, merge, vc.window_size, vc.patch_size)
            units = packed.view(-1, merge**2, packed.shape[-1])
            natural = torch.empty_like(units)
            natural[order] = units
            packed = natural.view_as(packed)
        return list(packed.split(grid.prod(-1).tolist()))

    return [[row for r, grid in enumerate(runs) for row in unpack(outputs[r * depth + i], grid)] for i in range(depth)]


def pixtral_hf_layers(hf) -> dict[str, list[nn.Module]]:
    return {"language": list(hf.model.language_model.layers), "vision": list(hf.model.vision_tower.transformer.layers)}


def pixtral_align(entry: Entry, hf, tower: str, outputs: list[torch.Tensor], inputs: VLMInputs):
    """HF's Pixtral tower runs all images as one packed sequence; per layer one [patch, d] tensor per image."""
    if tower != "vision":
        return outputs
    patches = (inputs.image_sizes // hf.config.vision_config.patch_size).prod(-1).tolist()
    return [list(out[0].split(patches)) for out in outputs]


def onevision_align(entry: Entry, hf, tower: str, outputs: list[torch.Tensor], inputs: VLMInputs):
    """HF runs its vision tower on the image tiles, then on the video frames; tl_vlm's rows are both, tiles first."""
    depth = len(hf.model.vision_tower.encoder.layers)
    if tower != "vision" or len(outputs) == depth:
        return outputs
    return [torch.cat([outputs[i], outputs[depth + i]]) for i in range(depth)]


def hf_run(entry: Entry, hf, inputs: VLMInputs) -> tuple[torch.Tensor, dict[str, list]]:
    """HF logits and every layer output of every tower (forward hooks on HF's layers), in tl_vlm's layout:
    per tower a list over layers of a tensor, or of a list of per-row tensors (Qwen's packed vision)."""
    layers = entry.hf_layers(hf)
    outputs: dict[str, list] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o[0] if isinstance(o, tuple) else o))
        for name, modules in layers.items()
        for layer in modules
    ]
    try:
        with torch.no_grad():
            logits = hf(**inputs.as_kwargs()).logits
    finally:
        for handle in handles:
            handle.remove()
    ran = {name: outs for name, outs in outputs.items() if outs}  # a text-only prompt skips the vision towers
    return logits, {name: entry.align(entry, hf, name, outs, inputs) for name, outs in ran.items()}


# ------------------------------------------------------------------------ head ablation by HF surgery
# (tl_vlm hook of the attention, HF linear layer whose input columns are that attention's heads) per layer.


def llava_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    return {
        "vision.blocks.{}.attn": lambda i: hf.model.vision_tower.encoder.layers[i].self_attn.out_proj,
        "blocks.{}.attn": lambda i: hf.model.language_model.layers[i].self_attn.o_proj,
    }


def blip2_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    heads = {
        "vision.blocks.{}.attn": lambda i: hf.vision_model.encoder.layers[i].self_attn.projection,
        "qformer.blocks.{}.attn": lambda i: hf.qformer.encoder.layer[i].attention.output.dense,
        "qformer.blocks.{}.cross_attn": lambda i: hf.qformer.encoder.layer[i].crossattention.output.dense,
    }
    lm = hf.language_model
    if hasattr(lm, "encoder"):  # Flan-T5
        heads.update({
            "encoder.blocks.{}.attn": lambda i: lm.encoder.block[i].layer[0].SelfAttention.o,
            "decoder.blocks.{}.attn": lambda i: lm.decoder.block[i].layer[0].SelfAttention.o,
            "decoder.blocks.{}.cross_attn": lambda i: lm.decoder.block[i].layer[1].EncDecAttention.o,
        })
    elif hasattr(lm.model, "decoder"):  # OPT
        heads["blocks.{}.attn"] = lambda i: lm.model.decoder.layers[i].self_attn.out_proj
    else:  # Vicuna (Llama)
        heads["blocks.{}.attn"] = lambda i: lm.model.layers[i].self_attn.o_proj
    return heads


def mllama_hf_layers(hf) -> dict[str, list[nn.Module]]:
    vision = hf.model.vision_model
    return {"language": list(hf.model.language_model.layers), "vision": list(vision.transformer.layers),
            "vision_global": list(vision.global_transformer.layers)}


def mllama_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    vision, language = hf.model.vision_model, hf.model.language_model
    return {
        "vision.blocks.{}.attn": lambda i: vision.transformer.layers[i].self_attn.o_proj,
        "vision_global.blocks.{}.attn": lambda i: vision.global_transformer.layers[i].self_attn.o_proj,
        "blocks.{}.attn": lambda i: language.layers[i].self_attn.o_proj,
        "blocks.{}.cross_attn": lambda i: language.layers[i].cross_attn.o_proj,
    }


def qwen_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    return {
        "vision.blocks.{}.attn": lambda i: hf.model.visual.blocks[i].attn.proj,
        "blocks.{}.attn": lambda i: hf.model.language_model.layers[i].self_attn.o_proj,
    }


def pixtral_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    return {
        "vision.blocks.{}.attn": lambda i: hf.model.vision_tower.transformer.layers[i].attention.o_proj,
        "blocks.{}.attn": lambda i: hf.model.language_model.layers[i].self_attn.o_proj,
    }


def internvl_hf_layers(hf) -> dict[str, list[nn.Module]]:
    return {"language": list(hf.model.language_model.layers), "vision": list(hf.model.vision_tower.encoder.layer)}


def idefics3_hf_layers(hf) -> dict[str, list[nn.Module]]:
    return {"language": list(hf.model.text_model.layers), "vision": list(hf.model.vision_model.encoder.layers)}


def internvl_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    return {
        "vision.blocks.{}.attn": lambda i: hf.model.vision_tower.encoder.layer[i].attention.projection_layer,
        "blocks.{}.attn": lambda i: hf.model.language_model.layers[i].self_attn.o_proj,
    }


def idefics3_heads(hf) -> dict[str, Callable[[int], nn.Linear]]:
    return {
        "vision.blocks.{}.attn": lambda i: hf.model.vision_model.encoder.layers[i].self_attn.out_proj,
        "blocks.{}.attn": lambda i: hf.model.text_model.layers[i].self_attn.o_proj,
    }


# ------------------------------------------------------------------------------------------- registry


@dataclass
class Entry:
    name: str  # the zoo builder's variant
    build: Callable  # builder(path, variant) -> saved checkpoint path
    hf_class: type
    make_cases: Callable  # (model, entry) -> {case: VLMInputs}; "batch" = padded batch of 2 prompts with images
    hf_layers: Callable  # hf -> {tower: [HF module whose output is blocks.{i} of that tower]}
    heads: Callable  # hf -> {attention hook prefix with {} for the layer: layer -> HF output linear}
    towers: tuple[str, ...]  # tl_vlm towers (model.towers()), declared so tests parametrize before loading
    cases: tuple[str, ...] = ("batch",)  # the case names make_cases returns
    attentions: tuple[str, ...] = ()  # the keys of heads(hf), declared for parametrization
    extra_hooks: tuple[str, ...] = ()  # hook names this entry must have beyond the per-block contract
    absent_hooks: tuple[str, ...] = ()  # hook names it must not have
    errors: dict = field(default_factory=dict)  # bad-input kind -> message regex
    align: Callable = lambda entry, hf, tower, outputs, inputs: outputs
    verify_images: Callable | None = None  # images verify runs on (None: its own samples)
    # Language blocks whose only attention is cross-attention (Mllama): they have ``cross_attn.*`` and
    # ``hook_cross_attn_out`` instead of ``attn.*`` / ``hook_attn_out``.
    cross_only_blocks: tuple[int, ...] = ()
    # Contract tests (``test`` or ``test[tower]``) that do not apply to this entry, with the reason.
    not_applicable: dict = field(default_factory=dict)
    moe_blocks: tuple[int, ...] = ()  # language blocks whose MLP is a mixture of experts (mlp.experts.{e}.*)
    path: object = None  # set once built
    flagship: Callable | None = None  # the flagship checkpoint's HF config, where the HF class's default is another's


LLAVA_HOOKS = ("hook_embed", "hook_text_embed", "hook_image_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
               "vision.hook_embed", "vision.hook_pos_embed", "projector.hook_in", "projector.hook_out",
               "projector.mlp.hook_pre", "projector.mlp.hook_post", "blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k",
               "blocks.0.mlp.hook_pre_linear")
LLAVA_ERRORS = {"no_pixels": "no pixel_values", "no_placeholders": "no image placeholder", "count": "feature vectors"}


def llava(name: str) -> Entry:
    siglip = name == "llava_interleave_siglip"  # SigLIP has no pre-LN
    pre_ln = ("vision.ln_pre.hook_scale", "vision.ln_pre.hook_normalized")
    return Entry(
        name, build_tiny_vlm,
        LlavaNextForConditionalGeneration if name == "llava_next_mistral" else LlavaForConditionalGeneration,
        llava_cases, llava_hf_layers, llava_heads, ("language", "vision"),
        cases=("batch", "batch_right", "text"), attentions=("vision.blocks.{}.attn", "blocks.{}.attn"),
        extra_hooks=LLAVA_HOOKS + (() if siglip else pre_ln), absent_hooks=pre_ln if siglip else (),
        errors=LLAVA_ERRORS,
        verify_images=(lambda: sample_images(2, sizes=NON_SQUARE)) if name == "llava_next_mistral" else None,
    )


def onevision() -> Entry:
    return Entry(
        "llava_onevision", lambda path, name: build_tiny_onevision(path), LlavaOnevisionForConditionalGeneration,
        onevision_cases, llava_hf_layers, llava_heads, ("language", "vision"),
        cases=("batch", "batch_right", "multi_image", "video", "video_and_image", "text"),
        attentions=("vision.blocks.{}.attn", "blocks.{}.attn"), extra_hooks=LLAVA_HOOKS,
        absent_hooks=("vision.ln_pre.hook_scale", "vision.ln_pre.hook_normalized"), errors=LLAVA_ERRORS,
        align=onevision_align,
    )


BLIP2_HOOKS = ("qformer.hook_query_embed", "qformer.ln_embed.hook_scale", "vision.hook_embed", "vision.hook_pos_embed",
               "vision.ln_post.hook_normalized", "projector.hook_in", "projector.hook_out", "hook_embed",
               "hook_image_embed", "hook_text_embed")
INSTRUCTBLIP_HOOKS = ("qformer.hook_text_embed", "qformer.hook_pos_embed", "qformer.blocks.0.mlp_text.hook_pre")
T5_HOOKS = ("encoder.hook_rel_pos_bias", "decoder.hook_rel_pos_bias", "decoder.hook_embed", "encoder.ln_final.hook_scale",
            "decoder.ln_final.hook_normalized", "decoder.blocks.0.hook_cross_attn_out", "decoder.blocks.0.hook_resid_mid_cross",
            "decoder.blocks.0.ln3.hook_scale", "decoder.blocks.0.mlp.hook_pre_linear")
BLIP2_ERRORS = {"no_pixels": "no pixel_values", "count": "num_query_tokens"}


def blip2(name: str) -> Entry:
    t5 = name.endswith("flan_t5")
    hooks = BLIP2_HOOKS + (INSTRUCTBLIP_HOOKS if name.startswith("instructblip") else ())
    if t5:
        hooks += T5_HOOKS
    else:
        hooks += ("ln_final.hook_scale",) + (("hook_pos_embed",) if name == "blip2_opt" else ("blocks.0.attn.hook_rot_q",))
    language = ("encoder.blocks.{}.attn", "decoder.blocks.{}.attn", "decoder.blocks.{}.cross_attn") if t5 else ("blocks.{}.attn",)
    return Entry(
        name, build_tiny_blip2,
        InstructBlipForConditionalGeneration if name.startswith("instructblip") else Blip2ForConditionalGeneration,
        blip2_cases, blip2_hf_layers, blip2_heads,
        (("encoder", "decoder") if t5 else ("language",)) + ("vision", "qformer"),
        attentions=("vision.blocks.{}.attn", "qformer.blocks.{}.attn", "qformer.blocks.{}.cross_attn") + language,
        extra_hooks=hooks, absent_hooks=("vision.ln_pre.hook_scale",) + (("blocks.0.hook_resid_pre",) if t5 else ()),
        errors=BLIP2_ERRORS,
    )


QWEN_HOOKS = ("vision.hook_embed", "projector.hook_in", "projector.ln.hook_scale", "projector.ln.hook_normalized",
              "projector.mlp.hook_pre", "projector.mlp.hook_post", "projector.hook_out", "hook_embed", "hook_image_embed",
              "hook_text_embed", "blocks.0.attn.hook_rot_q", "vision.blocks.0.attn.hook_rot_q", "vision.blocks.0.attn.hook_rot_k")
QWEN_ERRORS = {"no_pixels": "no pixel_values", "no_placeholders": "no <\\|image_pad\\|> token", "count": "runs of"}


def qwen(name: str) -> Entry:
    return Entry(
        name, build_tiny_qwen_vl,
        Qwen2VLForConditionalGeneration if name == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration,
        qwen_cases, qwen_hf_layers, qwen_heads, ("language", "vision"),
        cases=("batch", "two_images", "video", "text"), attentions=("vision.blocks.{}.attn", "blocks.{}.attn"),
        extra_hooks=QWEN_HOOKS, errors=QWEN_ERRORS, align=qwen_align,
        verify_images=lambda: sample_images(2, sizes=[(40, 28), (28, 56)]),  # unequal sizes: HF packs them
    )


MLLAMA_NO_SELF_ATTENTION = (
    "the language blocks at cross_attention_layers have no self-attention (no hook_attn_out / attn.*), which this "
    "TL tool reads in every block; tests/test_mllama.py runs the residual-stream and cross-attention versions"
)

MLLAMA_GATED = (
    "gated layers scale hook_attn_out / hook_mlp_out by tanh(gate) after the per-head results and neurons, so those "
    "do not sum to the stream (decompose_resid does; tests/test_mllama.py)"
)


def mllama() -> Entry:
    return Entry(
        "mllama", build_tiny_mllama, MllamaForConditionalGeneration, mllama_cases, mllama_hf_layers, mllama_heads,
        ("language", "vision", "vision_global"), cases=("batch", "batch_right", "multi_image"),
        attentions=("vision.blocks.{}.attn", "vision_global.blocks.{}.attn", "blocks.{}.attn", "blocks.{}.cross_attn"),
        extra_hooks=("hook_embed", "vision.hook_embed", "vision.hook_tile_embed", "vision_global.hook_tile_embed",
                     "vision.ln_pre.hook_scale", "vision.ln_post.hook_normalized", "projector.hook_in",
                     "projector.hook_out", "blocks.2.hook_cross_attn_out", "blocks.2.cross_attn.q_norm.hook_scale",
                     "blocks.2.cross_attn.k_norm.hook_normalized", "blocks.0.attn.hook_rot_q"),
        absent_hooks=("blocks.2.attn.hook_q", "blocks.2.hook_attn_out", "blocks.0.cross_attn.hook_q"),
        errors={"no_pixels": "no pixel_values", "no_placeholders": "<\\|image\\|> tokens but", "count": "tokens but"},
        cross_only_blocks=(2, 3),
        not_applicable={
            "test_weight_processing_keeps_probabilities": "weight processing of cross-attention language models is "
            "refused (a cross-attention block's norm feeds its queries only; not implemented)",
            "test_language_patching_matches_manual_loops": MLLAMA_NO_SELF_ATTENTION,
            "test_logit_lens_and_cache_algebra": MLLAMA_NO_SELF_ATTENTION,
            "test_decompositions_are_exact_at_every_position[language]": MLLAMA_NO_SELF_ATTENTION,
            "test_decompositions_are_exact_at_every_position[vision_global]": MLLAMA_GATED,
            "test_every_hook_point_fires_with_tl_shapes[vision_global]": MLLAMA_GATED,
            "test_attribution_patching_reaches_the_first_block": "clean and corrupted runs differ only in the image, "
            "which enters at the cross-attention layers: blocks.0.hook_resid_pre is the same in both, its attribution "
            "exactly 0; tests/test_mllama.py attributes the first cross-attention block and the vision tower",
        },
    )


def not_applicable(entry: Entry, test: str, detail: str | None = None) -> None:
    """Skip ``test`` (for ``detail``, e.g. a tower) where the entry declares it does not apply, with its reason."""
    import pytest

    key = f"{test}[{detail}]" if detail is not None else test
    if key in entry.not_applicable:
        pytest.skip(f"{entry.name}: {entry.not_applicable[key]}")


def attention_layers(entry: Entry, attention: str, n_layers: int) -> list[int]:
    """The layers that have this attention (``blocks.{}.attn`` is absent from cross-only blocks, which alone have
    ``blocks.{}.cross_attn`` in a decoder-only LM)."""
    if attention == "blocks.{}.attn":
        return [i for i in range(n_layers) if i not in entry.cross_only_blocks]
    if attention == "blocks.{}.cross_attn" and entry.cross_only_blocks:
        return list(entry.cross_only_blocks)
    return list(range(n_layers))


QWEN3_HOOKS = QWEN_HOOKS + ("vision.hook_pos_embed", "blocks.0.attn.q_norm.hook_normalized", "blocks.0.hook_deepstack",
                             "projector.deepstack.0.hook_in", "projector.deepstack.0.ln.hook_scale",
                             "projector.deepstack.0.hook_out")


QWEN3_MOE_HOOKS = QWEN3_HOOKS + ("blocks.0.mlp.hook_pre_linear", "blocks.1.mlp.hook_router_logits",
                                 "blocks.1.mlp.hook_expert_indices", "blocks.1.mlp.hook_expert_weights",
                                 "blocks.1.mlp.experts.3.hook_out", "blocks.1.mlp.experts.0.hook_post")


def qwen3(name: str) -> Entry:
    moe = name == "qwen3_vl_moe"
    return Entry(
        name, build_tiny_qwen3_vl, Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration,
        qwen3_cases, qwen_hf_layers, qwen_heads, ("language", "vision"), cases=("batch", "two_images", "video", "text"),
        attentions=("vision.blocks.{}.attn", "blocks.{}.attn"),
        absent_hooks=("blocks.1.hook_deepstack", "projector.deepstack.1.hook_out") + (("blocks.1.mlp.hook_pre",) if moe else ()),
        extra_hooks=QWEN3_MOE_HOOKS if moe else QWEN3_HOOKS,
        errors=QWEN_ERRORS, align=qwen_align,
        verify_images=lambda: sample_images(2, sizes=[(40, 28), (28, 56)]), moe_blocks=(1,) if moe else (),
    )


PIXTRAL_HOOKS = ("vision.hook_embed", "vision.ln_pre.hook_scale", "vision.ln_pre.hook_normalized",
                 "vision.blocks.0.attn.hook_rot_q", "vision.blocks.0.attn.hook_rot_k", "vision.blocks.0.mlp.hook_pre_linear",
                 "projector.hook_in", "projector.mlp.hook_pre", "projector.mlp.hook_post", "projector.hook_out",
                 "hook_embed", "hook_image_embed", "hook_text_embed", "blocks.0.attn.hook_rot_q")
MISTRAL3_HOOKS = ("projector.ln.hook_scale", "projector.ln.hook_normalized", "projector.hook_unfolded",
                  "projector.hook_merged")


def pixtral_flagship():
    """mistral-community/pixtral-12b's config (LLaVA's default is a CLIP + Llama LLaVA 1.5)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    return LlavaConfig(
        vision_config=PixtralVisionConfig(hidden_act="silu", rope_parameters={"rope_type": "axial", "rope_theta": 1e4}),
        text_config=MistralConfig(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=128, vocab_size=131072, sliding_window=None,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e9}),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=10,
    )


def pixtral(name: str) -> Entry:
    return Entry(
        name, build_tiny_pixtral,
        LlavaForConditionalGeneration if name == "pixtral" else Mistral3ForConditionalGeneration,
        pixtral_cases, pixtral_hf_layers, pixtral_heads, ("language", "vision"),
        cases=("batch", "batch_right", "multi_image", "text"), attentions=("vision.blocks.{}.attn", "blocks.{}.attn"),
        extra_hooks=PIXTRAL_HOOKS + (MISTRAL3_HOOKS if name == "mistral3" else ()),
        absent_hooks=("vision.hook_pos_embed",) + (() if name == "mistral3" else MISTRAL3_HOOKS),
        errors=LLAVA_ERRORS, align=pixtral_align, verify_images=lambda: sample_images(2, sizes=PIXTRAL_SIZES),
        flagship=pixtral_flagship if name == "pixtral" else None,
    )


INTERNVL_HOOKS = ("hook_embed", "hook_text_embed", "hook_image_embed", "vision.hook_embed", "vision.hook_pos_embed",
                  "projector.hook_in", "projector.hook_shuffled", "projector.ln.hook_scale", "projector.ln.hook_normalized",
                  "projector.mlp.hook_pre", "projector.mlp.hook_post", "projector.hook_out", "blocks.0.attn.hook_rot_q")


def internvl() -> Entry:
    return Entry(
        "internvl3", build_tiny_internvl, InternVLForConditionalGeneration, internvl_cases, internvl_hf_layers,
        internvl_heads, ("language", "vision"), cases=("batch", "multi_image", "text"),
        attentions=("vision.blocks.{}.attn", "blocks.{}.attn"), extra_hooks=INTERNVL_HOOKS,
        absent_hooks=("vision.ln_pre.hook_scale", "vision.ln_post.hook_scale", "vision.blocks.0.attn.q_norm.hook_scale"),
        errors={"no_pixels": "no pixel_values", "no_placeholders": "no image placeholder", "count": "whole number of tiles"},
        verify_images=lambda: sample_images(2, sizes=INTERNVL_SIZES),
    )


IDEFICS3_HOOKS = ("hook_embed", "hook_text_embed", "hook_image_embed", "vision.hook_embed", "vision.hook_pos_embed",
                  "vision.ln_post.hook_normalized", "projector.hook_in", "projector.hook_shuffled", "projector.hook_out",
                  "blocks.0.attn.hook_rot_q")


def idefics3(name: str) -> Entry:
    return Entry(
        name, build_tiny_idefics3,
        Idefics3ForConditionalGeneration if name == "idefics3" else SmolVLMForConditionalGeneration,
        idefics3_cases, idefics3_hf_layers, idefics3_heads, ("language", "vision"),
        cases=("batch", "padded", "text") if name == "idefics3" else ("batch", "text"),
        attentions=("vision.blocks.{}.attn", "blocks.{}.attn"), extra_hooks=IDEFICS3_HOOKS,
        absent_hooks=("vision.ln_pre.hook_scale", "projector.mlp.hook_pre", "projector.ln.hook_scale"),
        errors={"no_pixels": "no pixel_values", "no_placeholders": "no image placeholder", "count": "real sub-images"},
    )


GEMMA_HOOKS = ("hook_embed", "hook_text_embed", "hook_image_embed", "ln_final.hook_scale", "vision.hook_embed",
               "vision.hook_pos_embed", "vision.ln_post.hook_normalized", "projector.hook_in", "projector.hook_out",
               "blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.0.mlp.hook_pre_linear")
POST_NORM_HOOKS = ("blocks.0.ln1_post.hook_scale", "blocks.0.ln1_post.hook_normalized", "blocks.1.ln2_post.hook_scale",
                   "blocks.1.ln2_post.hook_normalized")
QK_NORM_HOOKS = ("blocks.0.attn.q_norm.hook_scale", "blocks.1.attn.k_norm.hook_normalized")


def gemma3_flagship():
    """gemma-3-4b-it's config: HF's default pairs a 224 px SigLIP with 256 image tokens, which no pooling gives."""
    from transformers import Gemma3Config, SiglipVisionConfig

    return Gemma3Config(vision_config=SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=896,
        patch_size=14, vision_use_head=False).to_dict())


def paligemma2_flagship():
    """paligemma2-3b's config: Gemma 2 2B (HF's default LM is PaliGemma 1's Gemma) and SigLIP so400m."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    text = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=257216)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=224, patch_size=14, projection_dim=2304)
    return PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=2304)


def gemma(name: str) -> Entry:
    hooks = GEMMA_HOOKS + (POST_NORM_HOOKS if name != "paligemma" else ())
    if name == "gemma3":
        hooks += QK_NORM_HOOKS + ("projector.hook_pooled", "projector.ln.hook_scale", "projector.ln.hook_normalized")
    absent = ("vision.ln_pre.hook_scale",) + (POST_NORM_HOOKS if name == "paligemma" else ()) + (
        QK_NORM_HOOKS if name != "gemma3" else ())
    return Entry(
        name, build_tiny_gemma, Gemma3ForConditionalGeneration if name == "gemma3" else PaliGemmaForConditionalGeneration,
        gemma_cases, llava_hf_layers, llava_heads, ("language", "vision"),  # HF's Gemma 3 / PaliGemma: LLaVA's layout
        cases=("batch", "batch_right", "multi_image" if name == "gemma3" else "suffix", "text"),
        attentions=("vision.blocks.{}.attn", "blocks.{}.attn"), extra_hooks=hooks, absent_hooks=absent,
        errors=LLAVA_ERRORS, flagship={"gemma3": gemma3_flagship, "paligemma2": paligemma2_flagship}.get(name),
    )


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in [
        llava("llava15"), llava("llava_qwen2"), llava("llava_interleave_siglip"), llava("llava_next_mistral"),
        onevision(),
        blip2("blip2_opt"), blip2("blip2_flan_t5"), blip2("instructblip_vicuna"), blip2("instructblip_flan_t5"),
        qwen("qwen2_vl"), qwen("qwen2_5_vl"), qwen3("qwen3_vl"), qwen3("qwen3_vl_moe"),
        mllama(),
        pixtral("pixtral"), pixtral("mistral3"),
        internvl(), idefics3("idefics3"), idefics3("smolvlm"),
        gemma("gemma3"), gemma("paligemma"), gemma("paligemma2"),
    ]
}
NAMES = tuple(REGISTRY)


def params(select: Callable[[Entry], list] | None = None):
    """pytest params over the registry (``select`` expands an entry into extra per-entry values)."""
    import pytest

    if select is None:
        return [pytest.param(name, id=name) for name in NAMES]
    return [pytest.param(name, value, id=f"{name}-{value}") for name in NAMES for value in select(REGISTRY[name])]


# ------------------------------------------------------------------------------------- shared checks


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[mask] if mask is not None else diff).max().item()


def logits_mask(model, inputs: VLMInputs) -> torch.Tensor | None:
    """Real positions of the logits: the prompt's for a decoder-only LM; all decoder positions for T5."""
    if model.capabilities.encoder_decoder or inputs.attention_mask is None:
        return None
    return inputs.attention_mask.bool()


def generation_inputs(inputs: VLMInputs) -> VLMInputs:
    """What generate takes: the forward inputs without decoder ids (generate starts the decoder itself)."""
    return dataclasses.replace(inputs, decoder_input_ids=None)


def tower_of(hook: str) -> str:
    """The tower a hook name belongs to (``blocks.*`` and top-level names are the language model's)."""
    head = hook.split(".")[0]
    return head if head in ("vision", "vision_global", "qformer", "encoder", "decoder") else "language"


def resid_hook(tower: str, layer: int) -> str:
    """The hook holding a tower block's output (the Q-Former's BERT blocks are post-LN)."""
    prefix = "" if tower == "language" else f"{tower}."
    kind = "hook_normalized_resid_post" if tower == "qformer" else "hook_resid_post"
    return f"{prefix}blocks.{layer}.{kind}"


def assert_hidden_states_match(model, cache, hf: dict[str, list], inputs: VLMInputs) -> None:
    """Every block output of every tower in ``cache`` within ATOL of HF's (``hf_run``'s layout); language and
    encoder states at real prompt positions only."""
    real = inputs.attention_mask.bool() if inputs.attention_mask is not None else None
    for tower, layers in hf.items():
        assert len(layers) == model.tower(tower).cfg.n_layers, tower
        prompt_positions = real if tower in ("language", "encoder") else None
        for i, hidden in enumerate(layers):
            ours = cache[resid_hook(tower, i)]
            if isinstance(hidden, list):  # one tensor per image / video row (Qwen's packed vision)
                assert ours.shape[0] == len(hidden), "one row per image / video"
                for row, h in enumerate(hidden):
                    assert max_diff(ours[row, : h.shape[0]], h) <= ATOL, f"{tower} layer {i}, row {row}"
            else:
                assert max_diff(ours, hidden, prompt_positions) <= ATOL, f"{tower} layer {i}"


@dataclass
class HalfPrecision:
    """One checkpoint in half precision, each way a user gets there: HF loaded in ``dtype`` with tl_vlm's
    ``from_pretrained`` and ``from_hf_model`` of it, and a float32 HF model cast with ``.to(dtype)`` (whose
    rotary frequencies the cast rounds) with ``from_hf_model`` of that."""

    hf: nn.Module
    ours: nn.Module
    shared: nn.Module
    cast: nn.Module
    from_cast: nn.Module

    @classmethod
    def load(cls, hf_class: type, path, dtype: torch.dtype) -> HalfPrecision:
        from transformers import AutoModelForImageTextToText

        from tl_vlm import HookedVLM

        hf = quiet(AutoModelForImageTextToText.from_pretrained, path, dtype=dtype).eval()
        cast = quiet(hf_class.from_pretrained, path).eval().to(dtype)
        return cls(hf, quiet(HookedVLM.from_pretrained, path, dtype=dtype), quiet(HookedVLM.from_hf_model, hf),
                   cast, quiet(HookedVLM.from_hf_model, cast))

    def logit_diffs(self, inputs: VLMInputs) -> dict[str, float]:
        """Max |ours - HF's| of the logits at real positions, per way (and a full cache); 0 is bit for bit."""
        mask = logits_mask(self.ours, inputs)
        with torch.no_grad():
            reference = self.hf(**inputs.as_kwargs()).logits.float()
            cached, _ = self.ours.run_with_cache(inputs)
            runs = {"from_pretrained": self.ours(inputs), "from_hf_model": self.shared(inputs), "cached": cached}
            diffs = {label: max_diff(logits.float(), reference, mask) for label, logits in runs.items()}
            diffs["cast"] = max_diff(self.from_cast(inputs).float(), self.cast(**inputs.as_kwargs()).logits.float(), mask)
        return diffs


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with warnings silenced (Qwen's processor warns about torchvision; folding RMSNorm warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)

