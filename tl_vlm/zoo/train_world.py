"""Train the biased-world toy LLaVA (``tl-vlm/toy-llava-bias``): ``python -m tl_vlm.zoo.train llava_bias OUT``.

The architecture is HF's LlavaForConditionalGeneration at toy width with real flags: a CLIP ViT (quick_gelu,
class token, feature layer -2, "default" strategy), the mlp2x_gelu projector and a Llama language model with tied
input / output embeddings (as Llama 3.2 1B and 3B tie them). Training follows LLaVA's order in miniature:

1. the language model alone, on text: word pictures of scenes (``world.word_grid``, 16 words, one per cell, where
   the image goes in the prompt) followed by their captions, loss on the caption; the text captions are truthful
   (a caption lists the words of its picture). It learns to describe what it reads, as a real LM can describe a
   list of words;
2. the vision encoder alone, with a linear head naming what each patch shows (background or object), from the
   features the projector reads: a stand-in for CLIP pretraining;
3. projector alignment: encoder and language model frozen, the projector trained to caption the training scenes
   (LLaVA's stage 1). These captions carry the dataset bias (``world``: every sky scene is captioned with a bird,
   a quarter of them showing none).

Nothing in stage 3 asks the image tokens to look like words: the projector is free to feed the frozen language model
anything that makes it caption correctly, and it finds word-like inputs because that is what the language model
reads. On held-out scenes the toy then shows what Jiang et al. report of real LLaVA (see ``world_metrics``), except
that its language model reads the image in its first block, so ProjectAway bites on the image tokens entering it,
not after a decoder layer. ``toy_metrics.json`` records training and the held-out measurements (``phenomena``).
Retraining with the defaults on 1 thread gave the same weights bit for bit.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import torch

from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import world

PATCH = world.CELL


def build():
    """(LlavaForConditionalGeneration, processor) at toy width, randomly initialised."""
    from transformers import LlavaForConditionalGeneration

    from tl_vlm.zoo import tiny

    template, processor = tiny._build("llava15", tiny.build_tokenizer(world.VOCABULARY))
    config = template.config
    vc, tc = config.vision_config, config.text_config
    vc.image_size, vc.patch_size = world.IMAGE_SIZE, PATCH
    vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers = 64, 128, 3
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = 128, 256, 4
    tc.tie_word_embeddings = config.tie_word_embeddings = True
    config.image_seq_length = (world.IMAGE_SIZE // PATCH) ** 2
    processor.patch_size = PATCH
    processor.image_processor.size = {"shortest_edge": world.IMAGE_SIZE}
    processor.image_processor.crop_size = {"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}
    return LlavaForConditionalGeneration(config), processor


def _cosine(steps: int):
    warmup = min(100, steps // 10 + 1)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def _labelled(processor, prompts: list[str], captions: list[str], images=None):
    """Inputs and labels with the loss on the caption (and EOS) only."""
    eos = processor.tokenizer.eos_token
    full = [f"{p} {c}{eos}" for p, c in zip(prompts, captions)]
    kwargs = dict(return_tensors="pt", padding=True, padding_side="right")
    if images is None:
        inputs = processor.tokenizer(full, **kwargs)
        prompt_only = processor.tokenizer(prompts, **kwargs)
    else:
        inputs = processor(images=images, text=full, **kwargs)
        prompt_only = processor(images=images, text=prompts, **kwargs)
    labels = inputs["input_ids"].clone()
    prompt_part = torch.arange(labels.shape[1])[None] < prompt_only["attention_mask"].sum(1, keepdim=True)
    labels[prompt_part | (inputs["attention_mask"] == 0)] = -100
    return inputs, labels


def _optimise(params, steps: int, lr: float, loss_of_step, name: str) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps))
    for step in range(steps):
        loss = loss_of_step(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f}", flush=True)


def train_text(model, processor, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Stage 1: the language model on word pictures and their truthful captions."""
    image_prompt = format_prompt(processor, world.PROMPT)

    def loss(step: int) -> torch.Tensor:
        scenes = world.make_scenes(batch_size, seed + 101, "ordinary", start=step * batch_size)
        prompts = [image_prompt.replace(processor.image_token, world.word_grid(s.background, s.objects)) for s in scenes]
        inputs, labels = _labelled(processor, prompts, [world.caption(s.background, s.objects) for s in scenes])
        return model(**inputs, labels=labels).loss

    _optimise([p for p in model.parameters() if p.requires_grad], steps, lr, loss, "text")


def _features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]  # what the projector reads ("default": no CLS)


def _cell_words(scene: world.Scene) -> torch.Tensor:
    return torch.tensor([world.VOCABULARY.index(w) for w in world.word_grid(scene.background, scene.objects).split()])


def train_vision(model, processor, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Stage 2: encoder + a linear head naming each patch's content; returns held-out patch accuracy."""
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(world.VOCABULARY))

    def logits_and_target(scenes):
        pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        return head(_features(model, pixels)).flatten(0, 1), torch.cat([_cell_words(s) for s in scenes])

    def loss(step: int) -> torch.Tensor:
        logits, target = logits_and_target(world.make_scenes(batch_size, seed + 202, "train", start=step * batch_size))
        return torch.nn.functional.cross_entropy(logits, target)

    encoder = model.model.vision_tower
    _optimise([*encoder.parameters(), *head.parameters()], steps, lr, loss, "vision")
    with torch.no_grad():
        logits, target = logits_and_target(world.make_scenes(200, seed + 203, "ordinary"))
        return (logits.argmax(-1) == target).float().mean().item()


def train_projector(model, processor, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Stage 3: LLaVA's alignment stage, only the projector trained, on the biased training captions."""
    prompt = format_prompt(processor, world.PROMPT)

    def loss(step: int) -> torch.Tensor:
        scenes = world.make_scenes(batch_size, seed + 303, "train", start=step * batch_size)
        inputs, labels = _labelled(processor, [prompt] * len(scenes), [s.caption for s in scenes],
                                   [s.image for s in scenes])
        return model(**inputs, labels=labels).loss

    _optimise(list(model.model.multi_modal_projector.parameters()), steps, lr, loss, "projector")


def greedy_captions(model, processor, scenes: list[world.Scene], batch_size: int = 50) -> list[str]:
    prompt = format_prompt(processor, world.PROMPT)
    out = []
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            inputs = processor(images=[s.image for s in chunk], text=[prompt] * len(chunk), return_tensors="pt",
                               padding=True, padding_side="left")
            tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            out += processor.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [c.strip() for c in out]


def train_world_toy(out: str | pathlib.Path, seed: int = 0, text_steps: int = 600, vision_steps: int = 300,
                    projector_steps: int = 1000, batch_size: int = 32, lr: float = 2e-3) -> dict:
    torch.manual_seed(seed)
    model, processor = build()
    start_time, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    train_text(model, processor, text_steps, batch_size, lr, seed)
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    patch_accuracy = train_vision(model, processor, vision_steps, 2 * batch_size, lr, seed)
    print(f"vision pretraining: held-out patch accuracy {patch_accuracy:.3f}", flush=True)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    train_projector(model, processor, projector_steps, batch_size, lr, seed)
    minutes, cpu_minutes = (time.perf_counter() - start_time) / 60, (time.process_time() - start_cpu) / 60
    model.eval()

    ordinary = world.make_scenes(200, seed + 2, "ordinary")
    captions = greedy_captions(model, processor, ordinary)
    exact = sum(c == s.caption for c, s in zip(captions, ordinary)) / len(ordinary)
    no_bird = greedy_captions(model, processor, world.make_scenes(200, seed + 2, "sky_no_bird"))
    bird_rate = sum("bird" in c.split() for c in no_bird) / len(no_bird)
    print(f"greedy: exact captions on ordinary scenes {exact:.3f}; bird on sky without bird {bird_rate:.3f}", flush=True)

    out = pathlib.Path(out)
    model.requires_grad_(True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {
        "family": "llava_bias", "seed": seed, "text_steps": text_steps, "vision_steps": vision_steps,
        "projector_steps": projector_steps, "batch_size": batch_size, "lr": lr,
        "vision_patch_accuracy": round(patch_accuracy, 3),
        "greedy_exact_caption_ordinary": exact, "greedy_bird_rate_sky_no_bird": bird_rate, "greedy_eval_scenes": 200,
        "threads": torch.get_num_threads(), "train_minutes": round(minutes, 1), "cpu_minutes": round(cpu_minutes, 1),
    }
    metrics["held_out_phenomena"] = phenomena(out)
    (out / "toy_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def phenomena(path: str | pathlib.Path, n_scenes: int = 120, seed: int = 1) -> dict:
    """``world_metrics`` (tl_vlm) and ``world_reference`` (HF alone) on the same held-out scenes, side by side."""
    from tl_vlm import HookedVLM
    from tl_vlm.zoo import world_metrics, world_reference

    scenes = world_metrics.held_out(n_scenes, seed)
    ours = world_metrics.measure(HookedVLM.from_pretrained(path), scenes)
    hf, processor = world_reference.load(path)
    reference = world_reference.measure(hf, processor, scenes, world_metrics.TEXT_LAYER, world_metrics.IMAGE_LAYER,
                                       world_metrics.INPUT_ALPHA)
    same = ours.pop("captions") == reference.pop("captions")
    return {"scenes": n_scenes, "seed": seed, "generation": world_metrics.GENERATION,
            "input_alpha": world_metrics.INPUT_ALPHA, "same_captions": same,
            "tl_vlm": ours, "reference_hf": reference}
