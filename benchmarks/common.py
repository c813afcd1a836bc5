"""Shared set-up for the benchmarks: random-init HF LLaVA models at chosen shapes, timing helpers."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

# DESIGN.md's reference shape: 4-layer 256-wide CLIP at 224px (256 patches), 4-layer 512-wide Llama.
SHAPES = {
    "tiny": dict(v_width=64, v_layers=2, v_heads=4, image=56, patch=14, t_width=128, t_layers=2, t_heads=4, vocab=1000),
    "design": dict(v_width=256, v_layers=4, v_heads=4, image=224, patch=14, t_width=512, t_layers=4, t_heads=8, vocab=32064),
    "llava15-width": dict(v_width=1024, v_layers=2, v_heads=16, image=336, patch=14, t_width=4096, t_layers=2, t_heads=32, vocab=32064),
}
IMAGE_TOKEN = 32000


def llava_config(shape: str) -> LlavaConfig:
    s = SHAPES[shape]
    vision = CLIPVisionConfig(
        hidden_size=s["v_width"], intermediate_size=4 * s["v_width"], num_hidden_layers=s["v_layers"],
        num_attention_heads=s["v_heads"], image_size=s["image"], patch_size=s["patch"], hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=s["t_width"], intermediate_size=int(2.6875 * s["t_width"]), num_hidden_layers=s["t_layers"],
        num_attention_heads=s["t_heads"], num_key_value_heads=s["t_heads"], vocab_size=s["vocab"], rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=min(IMAGE_TOKEN, s["vocab"] - 1),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def llava_model(shape: str, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config(shape)).eval()


def llava_inputs(config: LlavaConfig, batch: int = 1, text_tokens: int = 33, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(3, config.image_token_index - 1, (batch, text_tokens), generator=g)
    ids = torch.cat([text[:, :1], torch.full((batch, n_image), config.image_token_index), text[:, 1:]], dim=1)
    size = config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


def interleaved(runs: dict, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Median and spread (IQR) of each callable, timed round-robin so drift hits all alike."""
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
        q = statistics.quantiles(ts, n=4)
        out[name] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "n": len(ts)}
    return out


def write_report(name: str, rows: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    table = "\n".join(lines)
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)
