"""The demo's activation patching: clean activations pasted into the run on the repainted scene.

The metric is the logit difference clean answer - corrupted answer at the last position, normalised so
1 = clean answer restored, 0 = corrupted. Patched: the language stream entering each layer at all image positions,
at the image tokens covering the object's box and at the other image tokens; the vision stream entering each vision
layer, everywhere and split the same way; and every (layer, position) of the language stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.patching import get_act_patch_resid_pre

from tl_vlm import HookedVLM, VLMInputs
from tl_vlm.analysis.spatial import patch_image_region, region_mask, spatial_index
from tl_vlm.zoo.data import Example

MAX_POSITION_PATCHES = 4096  # forwards spent on the layer x position map at most (skipped above, with a note)
Metric = Callable[[Float[Tensor, "batch pos vocab"]], float]


def activation_patching(
    model: HookedVLM, clean_ex: Example, corrupt_ex: Example, clean: VLMInputs, corrupt: VLMInputs,
    answer_tokens: list[int], notes: list[str],
) -> dict:
    """Every patching experiment the model allows, as the report's ``patching`` section; caveats go to ``notes``."""
    clean_tok, corrupt_tok = answer_tokens
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(
            clean, names_filter=lambda n: n.endswith("hook_resid_pre") and not n.startswith("qformer."))
        corrupt_logits = model(corrupt)
    metric, diffs = _logit_diff_metric(clean_logits, corrupt_logits, clean_tok, corrupt_tok)
    if abs(diffs["clean"] - diffs["corrupted"]) < 1e-3:
        notes.append("clean and corrupted runs give almost the same logit difference; normalised patching "
                     "scores are unreliable for this model")
    patching = {
        "metric": f"(LD - LD_corrupted) / (LD_clean - LD_corrupted), "
                  f"LD = logit[{clean_ex.answer}] - logit[{corrupt_ex.answer}] at the last position",
        "answer_tokens": model.to_str_tokens(torch.tensor(answer_tokens)),
        "logit_diff": diffs,
        "language_resid_pre_at_image_positions": _patch_language(model, clean, corrupt, clean_cache, metric),
        "vision_resid_pre": _patch_vision(model, corrupt, clean_cache, metric),
    }
    if model.capabilities.queries:
        notes.append("BLIP-2: the image tokens are Q-Former queries, not patches, so patching the object's "
                     "region is skipped (every query reads the whole image)")
    else:
        box = clean_ex.objects[0]["box"]
        patching.update(patch_regions(model, clean, corrupt, clean_cache, clean_ex.image, box, metric))
    patching["layer_position"], patching["positions"] = _patch_positions(model, corrupt, clean_cache, metric, notes)
    return patching


def _logit_diff_metric(clean_logits, corrupt_logits, clean_tok: int, corrupt_tok: int) -> tuple[Metric, dict]:
    def diff(logits) -> float:
        last = logits[0, -1]
        return (last[clean_tok] - (last[corrupt_tok] if corrupt_tok != clean_tok else 0.0)).item()

    clean, corrupt = diff(clean_logits), diff(corrupt_logits)
    scale = clean - corrupt if abs(clean - corrupt) > 1e-6 else 1.0
    return (lambda logits: (diff(logits) - corrupt) / scale), {"clean": clean, "corrupted": corrupt}


def _patch_language(model, clean, corrupt, clean_cache, metric: Metric) -> list[float]:
    image = model.image_token_mask(corrupt.input_ids).to(model.device)
    if not torch.equal(image.cpu(), model.image_token_mask(clean.input_ids).cpu()):
        raise ValueError("clean and corrupted prompts must put the image at the same positions")
    scores = []
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(resid, hook, name=name):
            resid[image] = clean_cache[name][image]
            return resid

        with torch.no_grad():
            scores.append(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])))
    return scores


def patch_regions(model, clean, corrupt, clean_cache, image, box, metric: Metric) -> dict:
    """Per language layer: patch only the image tokens whose cell overlaps the object's box, then only the others;
    per vision layer: the same with the patches feeding those tokens."""
    index = spatial_index(model, clean, [image])
    x0, y0, x1, y1 = box  # inclusive pixel box -> half-open
    inside: Bool[Tensor, "batch pos"] = region_mask(index, clean.input_ids, 0, (x0, y0, x1 + 1, y1 + 1))
    rest = model.image_token_mask(clean.input_ids).cpu() & ~inside
    out: dict = {"object_region_tokens": int(inside.sum()), "image_tokens": int(inside.sum() + rest.sum()),
                 "language_resid_pre_object_region": [], "language_resid_pre_rest_of_image": []}
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            for mask, label in ((inside, "object_region"), (rest, "rest_of_image")):
                out[f"language_resid_pre_{label}"].append(metric(patch_image_region(model, corrupt, clean, mask, name)))
    # The same split in the vision tower: the patches feeding the object's tokens (a merge block of patches per
    # token for Qwen-VL), then all other patches (the class token and padding stay corrupted).
    patches = {True: [], False: []}
    for row in index[index["kind"] == "patch"].itertuples():
        patches[bool(inside[row.batch, row.position])] += [(row.tile, p) for p in model.token_patches(row._asdict())]
    for key, label in ((True, "vision_resid_pre_object_region"), (False, "vision_resid_pre_rest_of_image")):
        # an empty side (a box over the whole image) patches nothing: the corrupted run at every layer
        tiles, cols = (torch.tensor([pair[i] for pair in patches[key]], dtype=torch.long, device=model.device)
                       for i in (0, 1))
        out[label] = _patch_vision(model, corrupt, clean_cache, metric, (tiles, cols))
    return out


def _patch_vision(
    model, corrupt, clean_cache, metric: Metric, at: tuple[Int[Tensor, " n"], Int[Tensor, " n"]] | None = None
) -> list[float]:
    """The vision stream entering each vision layer patched everywhere, or only at ``at`` = (rows, patches)."""
    scores = []
    for layer in range(model.vision.cfg.n_layers):
        name = f"vision.blocks.{layer}.hook_resid_pre"

        def patch(resid, hook, name=name):
            if at is None:
                return clean_cache[name]
            resid[at] = clean_cache[name][at]
            return resid

        with torch.no_grad():
            scores.append(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])))
    return scores


def _patch_positions(model, corrupt, clean_cache, metric: Metric, notes: list) -> tuple[list | None, list[str]]:
    """The language stream entering each layer patched at one position at a time: [layer, position], with
    TransformerLens' own ``get_act_patch_resid_pre`` (the image rides along in the VLMInputs)."""
    labels = model.to_str_tokens(corrupt.input_ids[0])
    n_pos = corrupt.shape[1]
    if model.cfg.n_layers * n_pos > MAX_POSITION_PATCHES:
        notes.append(f"layer x position patching skipped: {model.cfg.n_layers} x {n_pos} forwards is more than "
                     f"{MAX_POSITION_PATCHES}")
        return None, labels
    with torch.no_grad():
        grid = get_act_patch_resid_pre(model, corrupt, clean_cache, lambda logits: torch.tensor(metric(logits)))
    return grid.tolist(), labels
