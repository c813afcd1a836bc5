"""The hallucination story measured on held-out scenes of the biased world, with tl_vlm's analysis functions.

``measure(model, scenes)`` captions each scene (``generate``, beam search as Jiang et al.: ``num_beams=5``) and
reports, as their paper does:

- ``hallucination``: per object, the share of captions mentioning it among scenes that do not show it; the biased
  object (bird) separately on sky scenes without a bird;
- ``confidence``: every object mention labelled real or hallucinated against the drawn objects and scored with its
  internal confidence c(o) (``analysis.hallucination``); AUROC and AP of flagging hallucinations by low c(o);
- ``pointing``: for each drawn object, the image token where the logit lens gives its word the highest probability
  (max over layers, ``confidence_map``) is a hit when its cell holds the object; chance is the share of the image
  the object covers (one cell of sixteen);
- ``project_away``: on each caption with hallucinated objects, ``ProjectAway`` of those objects, then caption again:
  the share of hallucinated mentions removed and of correct mentions kept (their Table: hallucination reduction and
  correct objects retained). ``project_away`` edits where the paper's hook does (the output of decoder layer
  ``image_layer``); ``project_away_at_input`` makes the same edit (``ProjectAway(..., image_layer="input")``, text
  direction of ``hidden_states[0]``) on the image tokens entering the language model, the projector's output: this toy's
  4-layer language model reads the image in its first block, before any decoder layer's output.

``world_reference.measure`` computes the same numbers on the HF model alone, for the side-by-side check.
"""

from __future__ import annotations

import torch

from tl_vlm.analysis.confidence import confidence_map
from tl_vlm.analysis.editing import ProjectAway, captions
from tl_vlm.analysis.hallucination import extract_mentions, hallucination_metrics, label_mentions, score_mentions
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import world

# Layers of the edit (the paper's numbering, HF hidden_states for the text direction). No pair removes anything on
# training scenes (the toy reads the image in block 0, see project_away_at_input); these are the paper's demo
# indices shifted to fit a 4-layer model.
TEXT_LAYER, IMAGE_LAYER = 1, 0
# alpha of the edit on the language model's input, chosen on 20 training sky scenes whose caption has an unseen bird
# (hallucinated birds removed / correct objects kept): 1.5 (the paper's) 35% / 100%, 2.5 90% / 95%, 3.5 100% / 85%,
# 5 100% / 65%.
INPUT_ALPHA = 2.5
GENERATION = dict(num_beams=5, max_new_tokens=12, do_sample=False)
OBJECTS = list(world.OBJECTS)


def held_out(n: int, seed: int = 1) -> list[world.Scene]:
    """``n`` held-out scenes, half ordinary, half sky without a bird (seeds never used in training)."""
    half = n // 2
    return world.make_scenes(n - half, seed + 10_000, "ordinary") + world.make_scenes(half, seed + 10_000, "sky_no_bird")


def mentioned(texts: list[str]) -> list[set[str]]:
    """The objects each caption mentions."""
    table = extract_mentions(texts, OBJECTS)
    return [set(table.loc[table["caption"] == i, "object"]) for i in range(len(texts))]


def hallucination_rates(scenes: list[world.Scene], said: list[set[str]]) -> dict:
    """Per object: mentions among scenes without it; the biased object on the scenes of its background without it."""
    background, biased = world.BIASED
    rates = {}
    for obj in OBJECTS:
        absent = [o for s, o in zip(scenes, said) if obj not in s.present]
        rates[obj] = sum(obj in o for o in absent) / len(absent)
    bait = [o for s, o in zip(scenes, said) if s.background == background and biased not in s.present]
    others = [r for obj, r in rates.items() if obj != biased]
    return {"per_object_when_absent": rates, f"{biased}_on_{background}_without_{biased}": sum(biased in o for o in bait) / len(bait),
            "other_objects_mean": sum(others) / len(others), "scenes": len(scenes)}


def pointing_game(model, scenes: list[world.Scene], inputs) -> dict:
    """Peak image token of each drawn object's logit-lens map (max over layers) against the object's cell."""
    heat = confidence_map(model, inputs, OBJECTS).amax(0)  # [scene, image token, object]
    index = spatial_index(model, inputs, [s.image for s in scenes])
    hits = total = 0
    for i, scene in enumerate(scenes):
        cells = index[index["batch"] == i]
        for obj, cell in scene.objects.items():
            peak = cells.iloc[int(heat[i, :, OBJECTS.index(obj)].argmax())]
            hits += int(peak["row"]) * world.GRID + int(peak["col"]) == cell
            total += 1
    return {"objects": total, "hits": hits, "accuracy": hits / total, "chance": 1 / world.GRID**2}


def project_away_table(model, scenes, rows, said: list[set[str]], text_layer: int = TEXT_LAYER,
                       image_layer: int | None = IMAGE_LAYER) -> dict:
    """ProjectAway of each caption's hallucinated objects: hallucinated mentions removed, correct ones kept.
    ``image_layer=None``: the edit on the language model's input (``image_layer="input"``, alpha ``INPUT_ALPHA``)."""
    removed = hallucinated = kept = correct = 0
    for scene, row, before in zip(scenes, rows, said):
        fake = sorted(before - scene.present)
        if not fake:
            continue
        edit = (ProjectAway(model, fake, text_layer, "input", INPUT_ALPHA) if image_layer is None
                else ProjectAway(model, fake, text_layer, image_layer))
        with edit.applied(row):
            after = mentioned(captions(model, row, **GENERATION))[0]
        real = before & scene.present
        hallucinated += len(fake)
        removed += len(set(fake) - after)
        correct += len(real)
        kept += len(real & after)
    return {"text_layer": text_layer, "image_layer": image_layer, "hallucinated_mentions": hallucinated,
            "removed": removed / hallucinated if hallucinated else None, "correct_mentions": correct,
            "kept": kept / correct if correct else None}


def measure(model, scenes: list[world.Scene]) -> dict:
    prompt = format_prompt(model.processor, world.PROMPT)
    batch = model.prepare(images=[s.image for s in scenes], text=[prompt] * len(scenes))
    rows = [model.prepare(images=s.image, text=prompt) for s in scenes]
    with torch.no_grad():
        texts = [t.strip() for t in captions(model, batch, **GENERATION)]
    said = mentioned(texts)
    # One mention per object and caption, as CHAIR counts them (a looping caption names an object twice).
    mentions = extract_mentions(texts, OBJECTS).drop_duplicates(["caption", "object"])
    mentions = label_mentions(mentions, [s.present for s in scenes])
    mentions = score_mentions(model, mentions, rows)
    scores = hallucination_metrics(mentions["confidence"], mentions["hallucinated"])
    return {
        "captions": texts,
        "hallucination": hallucination_rates(scenes, said),
        "confidence": {**scores, "mentions": len(mentions), "hallucinated": int(mentions["hallucinated"].sum()),
                       "mean_real": float(mentions.loc[~mentions["hallucinated"], "confidence"].mean()),
                       "mean_hallucinated": float(mentions.loc[mentions["hallucinated"], "confidence"].mean())},
        "pointing": pointing_game(model, scenes, batch),
        "project_away": project_away_table(model, scenes, rows, said),
        "project_away_at_input": project_away_table(model, scenes, rows, said, 0, None),
    }
