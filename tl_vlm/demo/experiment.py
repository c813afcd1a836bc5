"""The demo's experiment: one scene and its repainted twin through fidelity, answer, patching, localisation and
vision-head ablation. Everything lands in a JSON-ready report dict; nothing is printed or drawn here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm import HookedVLM
from tl_vlm.analysis.confidence import object_token_ids
from tl_vlm.demo.localization import localize, pointing_game
from tl_vlm.demo.patching import activation_patching
from tl_vlm.demo.tasks import COLOUR, Task
from tl_vlm.prompts import format_prompt
from tl_vlm.verify import verify
from tl_vlm.zoo.data import Example

KIND = "colour"  # the question the demo asks (the toys' held-out accuracy is reported for it)


@dataclass
class Result:
    """The report, and the arrays behind the figures that the report keeps only in summary."""

    report: dict
    clean: Example
    corrupted: Example
    heat: Float[Tensor, "height width"]  # logit-lens p(answer) painted over the clean scene's pixels
    confidence: Float[Tensor, "layer image_token"]  # logit-lens p(answer) per language layer and image token


def run_experiment(model: HookedVLM, model_name: str, seed: int, task: Task = COLOUR) -> Result:
    """Steps 1-5 of the demo on the scene drawn with `seed`; `model_name` is only recorded."""
    report: dict = {"model": model_name, "architecture": model.vlm_cfg.architecture, "task": task.name, "notes": []}
    clean_ex, corrupt_ex, others = task.scenes(seed)
    prompt = format_prompt(model.processor, clean_ex.question) + task.answer_prefix
    clean = model.prepare(images=clean_ex.image, text=prompt)
    corrupt = model.prepare(images=corrupt_ex.image, text=prompt)
    report["question"], report["truth"] = clean_ex.question, clean_ex.answer
    report["scene"] = {
        "seed": seed, "objects": [_jsonable(o) for o in clean_ex.objects], "description": task.describe(clean_ex.objects[0]),
        "corrupted": {"answer": corrupt_ex.answer, "objects": [_jsonable(o) for o in corrupt_ex.objects]},
    }
    report["fidelity"] = _fidelity(model, clean_ex.image, clean_ex.question)

    with torch.no_grad():
        tokens = model.generate(clean, max_new_tokens=8)
    # the answer as the model gives it: the prefix the prompt ends with (a caption's "a"), then what it generated
    report["answer"] = (task.answer_prefix + " " + model.tokenizer.decode(tokens[0, clean.shape[1]:].tolist(),
                                                                          skip_special_tokens=True)).strip()
    report["correct"] = task.first_word(report["answer"]) == clean_ex.answer

    # Each answer is scored by its first sub-token.
    answer_tokens = [object_token_ids(model, ex.answer)[0] for ex in (clean_ex, corrupt_ex)]
    report["patching"] = activation_patching(model, clean_ex, corrupt_ex, clean, corrupt, answer_tokens,
                                             report["notes"])

    box = clean_ex.objects[0]["box"]
    report["localization"], heat, conf = localize(model, clean, clean_ex.image, clean_ex.answer, box,
                                                  task.background(clean_ex))
    report["localization"]["pointing_game"] = pointing_game(model, [clean_ex, *others], task)
    if model.capabilities.queries:
        report["notes"].append("BLIP-2: localisation spreads each query's logit-lens score over the patches it "
                               "cross-attends to; the peak is a pixel of that map")

    report["vision_head_ablation"] = _ablate_vision_heads(model, clean, answer_tokens[0])
    report["hook_counts"] = _hook_counts(model)
    return Result(report, clean_ex, corrupt_ex, heat, conf)


def _jsonable(obj: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.items()}


def _fidelity(model: HookedVLM, image, question: str) -> dict:
    """``verify`` on the demo's own scene and question: the logits' and each language layer's max |diff| vs HF."""
    result = verify(model, images=[image], prompts=[question])
    diffs = [d.max_abs for d in result.layers if d.tower == "language"]
    return {"logits_max_abs_diff": result.logits_max_abs, "hidden_max_abs_diff": diffs,
            "worst_hidden_max_abs_diff": max(diffs)}


def _ablate_vision_heads(model: HookedVLM, inputs, token: int) -> list[dict]:
    """The change of the answer token's logit when each vision head's output is zeroed."""
    with torch.no_grad():
        base = model(inputs)[0, -1, token].item()
        rows = []
        for layer in range(model.vision.cfg.n_layers):
            for head in range(model.vision.cfg.n_heads):
                def ablate(z, hook, head=head):
                    z[:, :, head] = 0.0
                    return z

                logits = model.run_with_hooks(inputs, fwd_hooks=[(f"vision.blocks.{layer}.attn.hook_z", ablate)])
                rows.append({"layer": layer, "head": head, "logit_change": logits[0, -1, token].item() - base})
    return rows


def _hook_counts(model: HookedVLM) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in model.hook_dict:
        first = name.split(".")[0]
        tower = first if first in ("vision", "projector", "qformer") else "language"
        counts[tower] = counts.get(tower, 0) + 1
    return counts
