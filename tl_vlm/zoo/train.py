"""Train a toy VLM on the synthetic shapes task, fully offline (``python -m tl_vlm.zoo.train OUT``).

The LLaVA-architecture toy starts from the tiny LLaVA-1.5 fixture (CLIP quick_gelu tower, feature layer
-2, MLP projector, Llama LM, word-level tokenizer, HF processor) and learns to answer "What is the colour of
the shape?" and "What shape is it?" about generated images. Loss on the answer tokens only.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile

import torch

from tl_vlm.zoo.tiny import build_tiny_vlm, sample_images

IMAGE_SIZE = 48
QUESTIONS = {"colour": "What is the colour of the shape?", "shape": "What shape is it?"}


def examples(n: int, seed: int) -> list[tuple[object, str, str, str]]:
    """(image, question type, prompt, answer); question types alternate."""
    out = []
    for i, image in enumerate(sample_images(n, seed=seed)):
        kind = "colour" if i % 2 == 0 else "shape"
        out.append((image, kind, f"USER: <image>\n{QUESTIONS[kind]} ASSISTANT:", image.info[kind]))
    return out


def _batch(processor, batch):
    images = [im for im, *_ in batch]
    full = [f"{p} {a}{processor.tokenizer.eos_token}" for _, _, p, a in batch]
    inputs = processor(images=images, text=full, return_tensors="pt", padding=True, padding_side="right")
    prompts = processor(images=images, text=[p for _, _, p, _ in batch], return_tensors="pt", padding=True, padding_side="right")
    labels = inputs.input_ids.clone()
    prompt_part = torch.arange(labels.shape[1])[None] < prompts.attention_mask.sum(1, keepdim=True)
    labels[prompt_part | (inputs.attention_mask == 0)] = -100  # only the answer (+ EOS) is learned
    return inputs, labels


def accuracy(model, processor, held_out) -> dict[str, float]:
    """Greedy answers of the HF model, per question type."""
    hits: dict[str, list[bool]] = {k: [] for k in QUESTIONS}
    model.eval()
    with torch.no_grad():
        for image, kind, prompt, answer in held_out:
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            text = processor.tokenizer.decode(tokens[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
            hits[kind].append(text.strip().split()[:1] == [answer])
    return {k: sum(v) / len(v) for k, v in hits.items()}


def train_toy_llava(out: str | pathlib.Path, steps: int = 1500, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_vlm(pathlib.Path(tmp) / "base", "llava15", seed=seed)
        config = LlavaForConditionalGeneration.config_class.from_pretrained(base)
        processor = AutoProcessor.from_pretrained(base)
    # Shapes need more pixels and a wider vision tower than the equivalence fixture has.
    vc, tc = config.vision_config, config.text_config
    vc.image_size, vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers = IMAGE_SIZE, 64, 256, 4
    tc.hidden_size, tc.intermediate_size = 128, 256
    processor.image_processor.size = {"shortest_edge": IMAGE_SIZE}
    processor.image_processor.crop_size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    model = LlavaForConditionalGeneration(config)
    train, held_out = examples(steps * batch_size // 4, seed + 1), examples(200, seed + 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        start = (step * batch_size) % (len(train) - batch_size)
        inputs, labels = _batch(processor, train[start : start + batch_size])
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    scores = accuracy(model, processor, held_out)
    out = pathlib.Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "toy_metrics.json").write_text(json.dumps({"held_out_accuracy": scores, "steps": steps, "seed": seed}))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    print(train_toy_llava(args.out, steps=args.steps))


if __name__ == "__main__":
    main()
