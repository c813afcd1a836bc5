"""An independent reference for ``world_metrics``: Jiang et al.'s definitions written directly on the HF model.

Nothing here calls tl_vlm: HF's ``LlavaForConditionalGeneration`` and processor from the same folder, HF
``generate`` (``num_beams=5``), the logit lens as their code computes it (``lm_head`` of each of HF's
``output_hidden_states``, log-softmax, top-50 kept and renormalised, image positions by the placeholder id, a word's
sub-tokens its encoding without BOS), text directions from HF's hidden states of the word after BOS, and the edit
as a torch forward hook on the decoder layer ``model.language_model.layers[image_layer]`` (or, for the edit on
the language model's input, on ``model.multi_modal_projector``) subtracting
``alpha * max(<h, t> / <t, t>, 0) * t`` at image positions, object by object. Mentions are found by a word regex
(plural "-s"), AUROC and AP by scikit-learn, image token k of the 4x4 grid is cell k (row-major, the CLIP patch
order). Only the scenes and layer choices are shared with ``world_metrics``.
"""

from __future__ import annotations

import re

import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from tl_vlm.zoo import world

OBJECTS = list(world.OBJECTS)
GENERATION = dict(num_beams=5, max_new_tokens=12, do_sample=False)
TOP_K = 50


def load(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _objects_in(text: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {o for o in OBJECTS if o in words or o + "s" in words}


def _inputs(processor, scenes):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.PROMPT}]}], add_generation_prompt=True
    )
    return processor(images=[s.image for s in scenes], text=[prompt] * len(scenes), return_tensors="pt", padding=True)


def _captions(hf, processor, inputs) -> list[str]:
    with torch.no_grad():
        out = hf.generate(**inputs, **GENERATION)
    return [t.strip() for t in processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def word_maps(hf, processor, inputs) -> torch.Tensor:
    """[scene, layer, image token, object]: p_{l,m}(object), max over the object's sub-tokens."""
    with torch.no_grad():
        states = hf(**inputs, output_hidden_states=True).hidden_states
    at_image = inputs["input_ids"] == hf.config.image_token_index
    ids = [processor.tokenizer.encode(o)[1:] for o in OBJECTS]  # the paper's encode(word)[1:], dropping BOS
    maps = []
    for hidden in states:
        with torch.no_grad():
            scores = torch.log_softmax(hf.lm_head(hidden[at_image]), -1)
        scores = scores.masked_fill(scores < scores.topk(TOP_K, -1).values[..., -1:], float("-inf")).softmax(-1)
        maps.append(torch.stack([scores[:, i].amax(-1) for i in ids], -1).view(len(at_image), -1, len(OBJECTS)))
    return torch.stack(maps, 1)


def _direction(hf, processor, word: str, layer: int) -> torch.Tensor:
    ids = processor.tokenizer.encode(word)  # BOS + the word
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, -1]


def _edited_caption(hf, processor, inputs, words, text_layer, image_layer, alpha=1.5) -> str:
    directions = [_direction(hf, processor, w, text_layer) for w in words]
    prompt_len = inputs["input_ids"].shape[1]
    at_image = inputs["input_ids"][0] == hf.config.image_token_index

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if image_layer is None:  # [image tokens, d]: every projector output is an image token
            return remove(hidden)
        if hidden.shape[1] != prompt_len:
            return output  # cached decode steps: no image positions
        hidden = hidden.clone()
        hidden[:, at_image] = remove(hidden[:, at_image])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def remove(h):
        for t in directions:
            p = (h @ t / (t @ t)).clamp(min=0)
            h = h - alpha * p[..., None] * t
        return h

    # image_layer None: the image features entering the language model, i.e. the projector's output
    module = hf.model.multi_modal_projector if image_layer is None else hf.model.language_model.layers[image_layer]
    handle = module.register_forward_hook(hook)
    try:
        return _captions(hf, processor, inputs)[0]
    finally:
        handle.remove()


def measure(hf, processor, scenes, text_layer: int, image_layer: int, input_alpha: float) -> dict:
    inputs = _inputs(processor, scenes)
    texts = _captions(hf, processor, inputs)
    said = [_objects_in(t) for t in texts]
    background, biased = world.BIASED
    rates = {o: sum(o in s for s, sc in zip(said, scenes) if o not in sc.present)
             / sum(o not in sc.present for sc in scenes) for o in OBJECTS}
    bait = [s for s, sc in zip(said, scenes) if sc.background == background and biased not in sc.present]

    conf = word_maps(hf, processor, inputs).amax(1)  # [scene, image token, object]
    labels, scores = [], []
    for i, (sc, s) in enumerate(zip(scenes, said)):
        for o in sorted(s):
            labels.append(o not in sc.present)
            scores.append(conf[i, :, OBJECTS.index(o)].max().item())
    flags, negated = torch.tensor(labels).numpy(), -torch.tensor(scores).numpy()
    hits = [int(conf[i, :, OBJECTS.index(o)].argmax()) == cell for i, sc in enumerate(scenes) for o, cell in sc.objects.items()]

    def table(text_layer, image_layer, alpha):
        removed = hallucinated = kept = correct = 0
        for i, (sc, before) in enumerate(zip(scenes, said)):
            fake = sorted(before - sc.present)
            if not fake:
                continue
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            after = _objects_in(_edited_caption(hf, processor, row, fake, text_layer, image_layer, alpha))
            real = before & sc.present
            hallucinated, removed = hallucinated + len(fake), removed + len(set(fake) - after)
            correct, kept = correct + len(real), kept + len(real & after)
        return {"text_layer": text_layer, "image_layer": image_layer, "hallucinated_mentions": hallucinated,
                "removed": removed / hallucinated if hallucinated else None, "correct_mentions": correct,
                "kept": kept / correct if correct else None}

    others = [r for o, r in rates.items() if o != biased]
    return {
        "captions": texts,
        "hallucination": {"per_object_when_absent": rates,
                          f"{biased}_on_{background}_without_{biased}": sum(biased in s for s in bait) / len(bait),
                          "other_objects_mean": sum(others) / len(others), "scenes": len(scenes)},
        "confidence": {"auroc": float(roc_auc_score(flags, negated)), "ap": float(average_precision_score(flags, negated)),
                       "mentions": len(labels), "hallucinated": int(sum(labels))},
        "pointing": {"objects": len(hits), "hits": sum(hits), "accuracy": sum(hits) / len(hits), "chance": 1 / world.GRID**2},
        "project_away": table(text_layer, image_layer, 1.5),
        "project_away_at_input": table(0, None, input_alpha),
    }
