"""Train the toy VLMs on the synthetic task, fully offline: ``python -m tl_vlm.zoo.train llava OUT``.

Each toy is a real HF architecture at toy width, built from the tiny fixtures' configs (which keep the
real checkpoints' flags) and trained from scratch with a word-level tokenizer and an HF processor:

- ``llava``: CLIP ViT (quick_gelu, feature layer -2) + mlp2x_gelu projector + Llama;
- ``blip2``: EVA ViT + Q-Former (8 queries) + linear projector + OPT;
- ``qwen2_vl``: Qwen2-VL ViT (2D rotary) + 2x2 patch merger + Qwen2 LM with M-RoPE.

Training follows the real recipes in miniature. Stage 1 pretrains the vision encoder alone with linear
heads on what the scenes and charts show (shape, colour, position, count, bar values, highest bar), read
from the features the language side will see: it stands in for CLIP / EVA pretraining, and trains in a
minute where learning shape end to end through the language model takes many thousands of steps. Stage 2
freezes the encoder (the Qwen patch merger stays trainable, as the LLaVA projector and the Q-Former do) and
trains the rest on question answering, loss on the answer tokens (and EOS) only. Held-out greedy accuracy
per question type goes to ``toy_metrics.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data

PATCH = 8


def _llava():
    from transformers import LlavaForConditionalGeneration

    from tl_vlm.zoo import tiny

    model, processor = tiny._build("llava15", tiny.build_tokenizer(data.VOCABULARY))
    config = model.config
    vc, tc = config.vision_config, config.text_config
    vc.image_size, vc.patch_size = data.IMAGE_SIZE, PATCH
    vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers = 64, 256, 4
    tc.hidden_size, tc.intermediate_size = 128, 256
    config.image_seq_length = (data.IMAGE_SIZE // PATCH) ** 2
    processor.patch_size = PATCH
    processor.image_processor.size = {"shortest_edge": data.IMAGE_SIZE}
    processor.image_processor.crop_size = {"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}
    return LlavaForConditionalGeneration(config), processor


def _blip2():
    from transformers import Blip2ForConditionalGeneration

    from tl_vlm.zoo import tiny_blip2

    tok = tiny_blip2._tokenizer(data.VOCABULARY)
    model, processor = tiny_blip2._build("blip2_opt", tok, tok)
    config = model.config
    vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
    vc.image_size, vc.patch_size = data.IMAGE_SIZE, PATCH
    vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers = 64, 256, 4
    qc.hidden_size, qc.intermediate_size, qc.encoder_hidden_size = 64, 128, vc.hidden_size
    tc.hidden_size, tc.ffn_dim, tc.word_embed_proj_dim = 128, 256, 128
    processor.image_processor.size = {"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    return model, processor


def _qwen2_vl():
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from tl_vlm.families.qwen_processor import QwenImageTextProcessor
    from tl_vlm.zoo import tiny_qwen_vl

    tok = tiny_qwen_vl.build_qwen_tokenizer(data.VOCABULARY)
    config = tiny_qwen_vl._build("qwen2_vl", tok).config
    vc, tc = config.vision_config, config.text_config
    vc.patch_size, vc.depth, vc.embed_dim, vc.hidden_size = PATCH, 4, 64, 128
    tc.hidden_size, tc.intermediate_size = 128, 256
    tc.rope_parameters["mrope_section"] = [4, 6, 6]  # halves of the 32-wide heads, split like Qwen2-VL's
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE**2, "longest_edge": data.IMAGE_SIZE**2}, patch_size=PATCH,
        temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
    )
    return Qwen2VLForConditionalGeneration(config), QwenImageTextProcessor(tok, image_processor)


def _llava_features(model, pixels) -> torch.Tensor:
    hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]  # what the projector reads ("default": no CLS)


def _blip2_features(model, pixels) -> torch.Tensor:
    return model.vision_model(pixels["pixel_values"]).last_hidden_state  # what the Q-Former reads


def _qwen2_vl_features(model, pixels) -> torch.Tensor:
    merged = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
    return merged.reshape(len(pixels["image_grid_thw"]), -1, merged.shape[-1])  # the merged tokens the LM reads


@dataclass(frozen=True)
class ToyArchitecture:
    build: Callable[[], tuple]  # -> (HF model, processor)
    encoder: Callable[[Any], torch.nn.Module]  # the part pretrained in stage 1 and frozen in stage 2
    features: Callable[[Any, dict], torch.Tensor]  # [image, token, d]: what the language side reads


ARCHITECTURES = {
    "llava": ToyArchitecture(_llava, lambda m: m.model.vision_tower, _llava_features),
    "blip2": ToyArchitecture(_blip2, lambda m: m.vision_model, _blip2_features),
    "qwen2_vl": ToyArchitecture(_qwen2_vl, lambda m: m.model.visual, _qwen2_vl_features),
}
FAMILIES = tuple(ARCHITECTURES)


def _cosine(steps: int):
    warmup = min(200, steps // 10 + 1)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


_BAR_COLOURS = sorted(c for c in data.COLOURS if c != "white")
# Pretraining heads (number of classes) per image group; one group's heads share the group's images.
_HEADS = {
    "scene": {"shape": len(data.SHAPES), "colour": len(data.COLOURS), "position": len(data.POSITIONS)},
    "count": {"count": len(data.COUNT_WORDS)},
    "chart": {"bar_value": len(_BAR_COLOURS) * (data.MAX_VALUE + 1), "highest_bar": len(_BAR_COLOURS)},
}
_GROUP_KIND = {"scene": "shape", "count": "count", "chart": "bar_value"}


def _target(head: str, ex: data.Example) -> torch.Tensor:
    if head == "bar_value":  # value of every bar colour, 0 where absent
        values = dict.fromkeys(_BAR_COLOURS, 0) | {b["colour"]: b["value"] for b in ex.objects}
        return torch.tensor([values[c] for c in _BAR_COLOURS])
    if head == "highest_bar":
        return torch.tensor(_BAR_COLOURS.index(max(ex.objects, key=lambda b: b["value"])["colour"]))
    if head == "count":
        return torch.tensor(len(ex.objects) - 1)
    options = {"shape": data.SHAPES, "colour": sorted(data.COLOURS), "position": data.POSITIONS}[head]
    return torch.tensor(options.index(ex.objects[0][head]))


def pretrain_vision(
    family: str, model, processor, steps: int, batch_size: int, lr: float, seed: int
) -> dict[str, float]:
    """Stage 1: encoder + linear heads; returns held-out head accuracy. Half of each batch is single-shape
    scenes (shape, colour, position heads), a quarter multi-shape scenes, a quarter charts."""
    toy = ARCHITECTURES[family]

    def pooled(images) -> torch.Tensor:
        return toy.features(model, processor.image_processor(images, return_tensors="pt")).mean(1)

    d = pooled([data.make_examples(1, seed)[0].image]).shape[-1]
    heads = torch.nn.ModuleDict({h: torch.nn.Linear(d, n) for group in _HEADS.values() for h, n in group.items()})
    encoder = toy.encoder(model)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps))
    sizes = {"scene": batch_size // 2, "count": batch_size // 4, "chart": batch_size // 4}
    held_out = {g: data.make_examples(200, seed + 30 + i, kinds=(_GROUP_KIND[g],)) for i, g in enumerate(sizes)}

    def losses(groups: dict[str, list[data.Example]]) -> dict[str, tuple[torch.Tensor, float]]:
        out = {}
        for group, exs in groups.items():
            features = pooled([ex.image for ex in exs])
            for head in _HEADS[group]:
                logits = heads[head](features)
                target = torch.stack([_target(head, ex) for ex in exs])
                if head == "bar_value":
                    logits = logits.reshape(len(exs), len(_BAR_COLOURS), -1).transpose(1, 2)
                hits = (logits.argmax(1) == target).float().mean().item()
                out[head] = (torch.nn.functional.cross_entropy(logits, target), hits)
        return out

    encoder.train()
    for step in range(steps):
        batch = {g: data.make_examples(n, seed + 10 + i, (_GROUP_KIND[g],), start=step * n)
                 for i, (g, n) in enumerate(sizes.items())}
        loss = sum(v[0] for v in losses(batch).values())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"vision step {step} loss {loss.item():.3f}", flush=True)
    with torch.no_grad():
        return {h: round(hits, 3) for h, (_, hits) in losses(held_out).items()}


def _batch(processor, prompts: list[str], batch: list[data.Example]):
    eos = processor.tokenizer.eos_token
    images = [ex.image for ex in batch]
    full = [f"{p} {ex.answer}{eos}" for p, ex in zip(prompts, batch)]
    inputs = processor(images=images, text=full, return_tensors="pt", padding=True, padding_side="right")
    prompt_only = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="right")
    labels = inputs["input_ids"].clone()
    prompt_part = torch.arange(labels.shape[1])[None] < prompt_only["attention_mask"].sum(1, keepdim=True)
    labels[prompt_part | (inputs["attention_mask"] == 0)] = -100
    return inputs, labels


def accuracy(model, processor, held_out: list[data.Example], batch_size: int = 50) -> dict[str, float]:
    """Greedy answers of the HF model, exact match per question type."""
    hits: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(held_out), batch_size):
            chunk = held_out[start : start + batch_size]
            prompts = [format_prompt(processor, ex.question) for ex in chunk]
            images = [ex.image for ex in chunk]
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            new = tokens[:, inputs["input_ids"].shape[1]:]
            answers = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
            for ex, text in zip(chunk, answers):
                hits.setdefault(ex.kind, []).append(text.strip() == ex.answer)
    model.train()
    return {k: sum(v) / len(v) for k, v in hits.items()}


def train_toy(family: str, out: str | pathlib.Path, steps: int = 2500, batch_size: int = 32, lr: float = 2e-3,
              seed: int = 0, n_held_out: int = 600, eval_every: int = 0, vision_steps: int = 1500) -> dict:
    if family not in ARCHITECTURES:
        raise ValueError(f"unknown toy family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = ARCHITECTURES[family].build()
    start_time, start_cpu = time.perf_counter(), time.process_time()
    vision_scores = pretrain_vision(family, model, processor, vision_steps, 128, lr, seed) if vision_steps else {}
    print(f"vision pretraining held-out {vision_scores}", flush=True)
    for name, param in ARCHITECTURES[family].encoder(model).named_parameters():
        param.requires_grad_("merger" in name)
    held_out = data.make_examples(n_held_out, seed=seed + 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps))
    model.train()
    for step in range(steps):
        batch = data.make_examples(batch_size, seed + 1, start=step * batch_size)
        inputs, labels = _batch(processor, [format_prompt(processor, ex.question) for ex in batch], batch)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start_time:.0f}s)", flush=True)
        if eval_every and step and step % eval_every == 0:
            print(f"step {step} held-out {accuracy(model, processor, held_out[:200])}", flush=True)
    minutes, cpu_minutes = (time.perf_counter() - start_time) / 60, (time.process_time() - start_cpu) / 60
    scores = accuracy(model, processor, held_out)
    out = pathlib.Path(out)
    model.requires_grad_(True)
    model.eval().save_pretrained(out)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out)
    else:  # tl_vlm's Qwen image-text processor: tokenizer + image processor, as Qwen checkpoints ship them
        processor.tokenizer.save_pretrained(out)
        processor.image_processor.save_pretrained(out)
    metrics = {
        "family": family, "held_out_accuracy": scores, "held_out_examples": n_held_out, "held_out_seed": seed + 2,
        "vision_pretraining_accuracy": vision_scores, "vision_steps": vision_steps, "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "threads": torch.get_num_threads(),
        "train_minutes": round(minutes, 1), "cpu_minutes": round(cpu_minutes, 1),  # training only, not evaluation
    }
    (out / "toy_metrics.json").write_text(json.dumps(metrics, indent=1))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=(*FAMILIES, "llava_bias"))
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=1500)
    args = parser.parse_args()
    if args.family == "llava_bias":  # the biased world (zoo/world.py) trains in its own stages
        from tl_vlm.zoo.train_world import train_world_toy

        print(train_world_toy(args.out, seed=args.seed))
        return
    print(train_toy(args.family, args.out, args.steps, args.batch_size, args.lr, args.seed,
                    eval_every=args.eval_every, vision_steps=args.vision_steps))


if __name__ == "__main__":
    main()
