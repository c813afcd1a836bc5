"""Shared set-up for the benchmarks: random-init HF models of the three families at chosen shapes, with a
processor built offline, the inputs they run on, and timing / report helpers.

Shapes: ``tiny`` (toy widths, Python overhead dominates), ``design`` (DESIGN.md's reference scale: 4-layer
256-wide vision, 4-layer 512-wide language model, real vocabulary; checkpoints of a few hundred MB) and
``real`` (a real checkpoint's widths, heads, MLP sizes, vocabulary and image size, 2 layers per tower):
LLaVA-1.5-7B (CLIP ViT-L/14-336, Llama-7B), BLIP-2-OPT-2.7B (EVA ViT-g, BERT-base Q-Former, OPT-2.7B),
Qwen2-VL-2B (its ViT, Qwen2-1.5B).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from tl_vlm.families.qwen_processor import QwenImageTextProcessor
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.tiny import build_tokenizer
from tl_vlm.zoo.data import sample_images
from tl_vlm.zoo.tiny_qwen_vl import build_qwen_tokenizer

FAMILIES = ("llava", "blip2", "qwen2_vl")
SHAPES = ("tiny", "design", "real")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))  # gpu.sh sets results/gpu
# ~30 text tokens with the tiny word-level tokenizers.
PROMPT = "Describe the image. What colour is the object in the centre, and is it a circle, a square or a triangle?"

# Per family and shape: vision (width, layers, heads, mlp, image px, patch px), language (width, layers,
# heads, kv heads, mlp, vocab); BLIP-2 adds the Q-Former (width, layers, heads, mlp, queries).
LLAVA = {
    "tiny": ((64, 2, 4, 256, 56, 14), (128, 2, 4, 4, 344, 1000)),
    "design": ((256, 4, 4, 1024, 224, 14), (512, 4, 8, 8, 1376, 32064)),
    "real": ((1024, 2, 16, 4096, 336, 14), (4096, 2, 32, 32, 11008, 32064)),  # llava-1.5-7b
}
BLIP2 = {
    "tiny": ((48, 2, 4, 96, 56, 14), (32, 2, 4, 64, 8), (64, 2, 4, 4, 128, 1000)),
    "design": ((256, 4, 4, 1024, 224, 14), (256, 2, 4, 1024, 32), (512, 4, 8, 8, 2048, 50272)),
    "real": ((1408, 2, 16, 6144, 224, 14), (768, 2, 12, 3072, 32), (2560, 2, 32, 32, 10240, 50272)),  # blip2-opt-2.7b
}
QWEN2_VL = {
    "tiny": ((32, 2, 4, 128, 56, 14), (64, 2, 4, 2, 128, 1000)),
    "design": ((256, 4, 4, 1024, 224, 14), (512, 4, 8, 2, 1376, 151936)),
    "real": ((1280, 2, 16, 5120, 336, 14), (1536, 2, 12, 2, 8960, 151936)),  # Qwen2-VL-2B
}


def build(family: str, shape: str, seed: int = 0):
    """A random-init HF model (eval, fp32) and its processor, both built offline."""
    torch.manual_seed(seed)
    return {"llava": _llava, "blip2": _blip2, "qwen2_vl": _qwen2_vl}[family](shape)


def sibling(hf):
    """A second HF model of the same class whose parameters and buffers are ``hf``'s tensors (no second copy),
    for wrappers that rewire the model they wrap or runs that need another attention setting."""
    with torch.device("meta"):
        twin = type(hf)(copy.deepcopy(hf.config))
    for name, tensor in [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]:
        module, _, attr = name.rpartition(".")
        owner = twin.get_submodule(module)
        store = owner._parameters if attr in owner._parameters else owner._buffers
        store[attr] = tensor
    return twin.eval()


def inputs_for(processor, device: str | torch.device, dtype: torch.dtype, batch: int = 1, seed: int = 0) -> dict:
    """Processor outputs for ``batch`` generated images and PROMPT, on ``device``, pixels in ``dtype``."""
    size = _image_size(processor)
    images = [im.resize((size, size), Image.BICUBIC) for im in sample_images(batch, seed=seed)]
    text = [format_prompt(processor, PROMPT)] * batch
    out = processor(images=images, text=text, return_tensors="pt", **({"padding": True} if batch > 1 else {}))
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}


def block_modules(hf) -> list[tuple[str, torch.nn.Module]]:
    """Every transformer block of every tower (HF's GradientCheckpointingLayer), in execution order."""
    return [(name, m) for name, m in hf.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def save_checkpoint(family: str, shape: str, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Model + processor files (``save_pretrained``), so loaders start from files as users do."""
    hf, processor = build(family, shape)
    hf.to(dtype).save_pretrained(path)
    if isinstance(processor, QwenImageTextProcessor):  # HF's Qwen2VLProcessor needs torchvision; save its parts
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
    else:
        processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ families


def _llava(shape: str):
    (vw, vl, vh, vm, image, patch), (tw, tl, th, tkv, tm, vocab) = LLAVA[shape]
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vw, intermediate_size=vm, num_hidden_layers=vl, num_attention_heads=vh, image_size=image,
        patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=tw, intermediate_size=tm, num_hidden_layers=tl, num_attention_heads=th, num_key_value_heads=tkv,
        vocab_size=max(vocab, len(tok)), rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config).eval(), processor


def _blip2(shape: str):
    (vw, vl, vh, vm, image, patch), (qw, ql, qh, qm, queries), (tw, tl, th, _, tm, vocab) = BLIP2[shape]
    # The tiny vocabulary without its image_token attribute: BLIP-2's processor registers <image> itself.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer().backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", add_bos_token=True, padding_side="left",
    )
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": image, "width": image}), tok, num_query_tokens=queries)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=vw, intermediate_size=vm, num_hidden_layers=vl, num_attention_heads=vh, image_size=image,
            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer_config=dict(
            hidden_size=qw, num_hidden_layers=ql, num_attention_heads=qh, intermediate_size=qm, hidden_act="gelu",
            layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=vw,
        ),
        text_config=OPTConfig(
            vocab_size=max(vocab, len(processor.tokenizer)), hidden_size=tw, ffn_dim=tm, num_hidden_layers=tl,
            num_attention_heads=th, max_position_embeddings=2048, do_layer_norm_before=True, word_embed_proj_dim=tw,
            activation_function="relu", tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        num_query_tokens=queries,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.architectures = ["Blip2ForConditionalGeneration"]
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_()  # HF initialises the queries to zeros
    return model, processor


def _qwen2_vl(shape: str):
    (vw, vl, vh, vm, image, patch), (tw, tl, th, tkv, tm, vocab) = QWEN2_VL[shape]
    tok = build_qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    rotary = tw // th // 2  # M-RoPE splits the rotary frequencies 16:24:24 (temporal, height, width)
    section = [rotary // 4, 3 * rotary // 8, 3 * rotary // 8]
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=vl, embed_dim=vw, hidden_size=tw, num_heads=vh, mlp_ratio=vm // vw, hidden_act="quick_gelu",
            patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        text_config=dict(
            vocab_size=max(vocab, len(tok)), hidden_size=tw, intermediate_size=tm, num_hidden_layers=tl,
            num_attention_heads=th, num_key_value_heads=tkv, hidden_act="silu", max_position_embeddings=4096,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
            use_sliding_window=False, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    images = Qwen2VLImageProcessorPil(
        min_pixels=image * image, max_pixels=image * image, patch_size=patch, temporal_patch_size=2, merge_size=2,
    )
    return Qwen2VLForConditionalGeneration(config).eval(), QwenImageTextProcessor(tok, images)


def _image_size(processor) -> int:
    images = processor.image_processor
    if isinstance(images, Qwen2VLImageProcessorPil):
        return int(images.size["longest_edge"] ** 0.5)
    size = getattr(images, "crop_size", None) or images.size
    return size["height"]


# ------------------------------------------------------------------------------------ timing and reports


def interleaved(runs: dict, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Median, spread (IQR) and minimum of each callable, timed round-robin so drift hits all alike. On a
    shared machine the minimum is the least disturbed estimate of each run's own cost."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "min_s": min(ts), "n": len(ts)}
    return out


def write_report(name: str, rows: list[dict], meta: dict) -> None:
    out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = (row.get(k, "") for k in keys)
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    table = "\n".join(lines)
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)
