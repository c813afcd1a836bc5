"""``tl-vlm demo``: the main job, end to end on one model (the trained toy LLaVA unless told otherwise).

1. load through ``HookedVLM.from_pretrained`` and check it against HF's own model (logits, every layer);
2. draw a scene (``zoo.data.make_examples``), ask for the shape's colour, compare ``generate``'s answer with
   the ground truth;
3. activation patching, clean image into a corrupted run. The corrupted image is the same scene with the shape
   repainted in another colour (a minimal pair: same prompt, same geometry, different answer), and the metric is
   the logit difference clean answer - corrupted answer, normalised so 1 = clean answer restored, 0 = corrupted.
   Patched: the language stream entering each layer at all image positions, at the image tokens covering the
   object's box (``analysis.spatial``) and at the other image tokens; the vision residual stream per vision layer;
   and every (layer, position) of the language stream (a layer x position map);
4. logit-lens localisation (``analysis.confidence``): the probability of the answer word at each image token in
   each language layer; a hit when the peak token's patch holds pixels of the drawn shape;
5. zero-ablate each vision head and rank them by their effect on the answer's logit;
6. write ``report.json``, PNG figures, ``report.md`` and a self-contained ``report.html``.

BLIP-2's image tokens are Q-Former queries, not patches: region patching is skipped and the localisation spreads
each query's score over the patches it cross-attends to (both said in the printed notes). Encoder-decoder language
models (Flan-T5) are not supported here.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

import torch

from tl_vlm import HookedVLM

DEFAULT_MODEL = "tl-vlm/toy-llava"
KIND = "colour"
MAX_POSITION_PATCHES = 4096  # forwards spent on the layer x position map at most (skipped above, with a note)
FIGURES = {
    "scene": "scene.png",
    "localization": "localization.png",
    "confidence_map": "confidence_map.png",
    "patching_curves": "patching_curves.png",
    "patching_layer_position": "patching_layer_position.png",
}


def run_demo(
    model_name: str | None = None, out_dir: str = "tl_vlm_demo", device: str | None = None, seed: int = 0
) -> dict:
    """Run the demo on `model_name` (default: the toy LLaVA) and write its report to `out_dir`; returns the report."""
    from tl_vlm.zoo.toys import toy_checkpoint, toy_metrics

    start = time.perf_counter()
    model_name = str(model_name or DEFAULT_MODEL)
    model = HookedVLM.from_pretrained(model_name, device=device)
    if model.capabilities.encoder_decoder:
        raise NotImplementedError(
            "the demo runs decoder-only language models; for encoder-decoder checkpoints (Flan-T5) use `tl-vlm verify` "
            "and the hooks under encoder.* / decoder.*"
        )
    if model.processor is None:
        raise ValueError(f"{model_name} has no usable processor; the demo needs one to turn images into inputs")
    toy = ""
    if toy_checkpoint(model_name) is not None:
        accuracy = toy_metrics(model_name).get("held_out_accuracy", {}).get(KIND)
        toy = "toy" + (f", held-out {KIND} accuracy {accuracy:.2f}" if accuracy is not None else "")
    print(f"model: {model_name} ({', '.join(x for x in (model.vlm_cfg.architecture, toy) if x)})")
    # Tiny models gain nothing from threads, and on a busy machine OpenMP's spin-waiting makes each of the demo's
    # few hundred forwards many times slower (see tests/conftest.py); big models keep torch's setting.
    threads = torch.get_num_threads()
    if model.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)
    try:
        return _run(model, model_name, out_dir, seed, start)
    finally:
        torch.set_num_threads(threads)


def _run(model: HookedVLM, model_name: str, out_dir: str, seed: int, start: float) -> dict:
    from tl_vlm.store.extract import format_prompt

    queries = model.capabilities.queries
    report: dict = {"model": model_name, "architecture": model.vlm_cfg.architecture, "notes": []}
    clean_ex, corrupt_ex, others = _scenes(seed)
    prompt = format_prompt(model.processor, clean_ex.question)
    clean = model.prepare(images=clean_ex.image, text=prompt)
    corrupt = model.prepare(images=corrupt_ex.image, text=prompt)
    obj = clean_ex.objects[0]
    report["question"], report["truth"] = clean_ex.question, clean_ex.answer
    report["scene"] = {
        "seed": seed, "objects": [_jsonable(o) for o in clean_ex.objects],
        "corrupted": {"answer": corrupt_ex.answer, "objects": [_jsonable(o) for o in corrupt_ex.objects]},
    }

    report["fidelity"] = _fidelity(model, clean_ex.image, clean_ex.question)
    print(f"fidelity vs HF: max |logit diff| {report['fidelity']['logits_max_abs_diff']:.1e}, "
          f"worst language layer {report['fidelity']['worst_hidden_max_abs_diff']:.1e}")

    with torch.no_grad():
        tokens = model.generate(clean, max_new_tokens=8)
    report["answer"] = model.tokenizer.decode(tokens[0, clean.shape[1]:].tolist(), skip_special_tokens=True).strip()
    report["correct"] = _first_colour(report["answer"]) == clean_ex.answer
    print(f"scene (seed {seed}): a {obj['colour']} {obj['shape']} at {obj['position']}, box {tuple(obj['box'])}")
    print(f"Q: {clean_ex.question}\nA: {report['answer']!r}  (truth: {clean_ex.answer!r}, "
          f"{'right' if report['correct'] else 'wrong'})")

    # ------------------------------------------------------------------ activation patching
    clean_tok, corrupt_tok = _first_token(model, clean_ex.answer), _first_token(model, corrupt_ex.answer)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(
            clean, names_filter=lambda n: n.endswith("hook_resid_pre") and not n.startswith("qformer."))
        corrupt_logits = model(corrupt)
    metric, diffs = _logit_diff_metric(clean_logits, corrupt_logits, clean_tok, corrupt_tok)
    if abs(diffs["clean"] - diffs["corrupted"]) < 1e-3:
        report["notes"].append("clean and corrupted runs give almost the same logit difference; normalised patching "
                               "scores are unreliable for this model")
    patching = {
        "metric": f"(LD - LD_corrupted) / (LD_clean - LD_corrupted), "
                  f"LD = logit[{clean_ex.answer}] - logit[{corrupt_ex.answer}] at the last position",
        "answer_tokens": model.to_str_tokens(torch.tensor([clean_tok, corrupt_tok])),
        "logit_diff": diffs,
        "language_resid_pre_at_image_positions": _patch_language(model, clean, corrupt, clean_cache, metric),
        "vision_resid_pre": _patch_vision(model, corrupt, clean_cache, metric),
    }
    if queries:
        report["notes"].append("BLIP-2: the image tokens are Q-Former queries, not patches, so patching the object's "
                               "region is skipped (every query reads the whole image)")
    else:
        region = _patch_regions(model, clean, corrupt, clean_cache, clean_ex.image, obj["box"], metric)
        patching.update(region)
    patching["layer_position"], patching["positions"] = _patch_positions(
        model, corrupt, clean_cache, metric, report["notes"])
    report["patching"] = patching
    _print_patching(patching, clean_ex.answer, corrupt_ex.answer)

    # ------------------------------------------------------------------ logit-lens localisation
    report["localization"], heat, conf = _localize(model, clean, clean_ex.image, clean_ex.answer, obj["box"])
    report["localization"]["pointing_game"] = _pointing_game(model, [clean_ex, *others])
    if queries:
        report["notes"].append("BLIP-2: localisation spreads each query's logit-lens score over the patches it "
                               "cross-attends to; the peak is a pixel of that map")
    loc = report["localization"]
    print(f"logit lens: p({clean_ex.answer!r}) at image tokens peaks at {loc['peak']['where']} "
          f"(language layer {loc['peak']['layer']}, p={loc['peak']['p']:.2f}) -> "
          f"{'HIT' if loc['hit'] else 'MISS'} on the shape (box {tuple(obj['box'])}) (chance {loc['chance']:.0%})")
    game = loc["pointing_game"]
    print(f"  pointing game over {game['scenes']} scenes: {game['hits']}/{game['scenes']} hits "
          f"(chance {game['chance']:.0%})")

    # ------------------------------------------------------------------ vision heads
    report["vision_head_ablation"] = _ablate_vision_heads(model, clean, clean_tok)
    top = sorted(report["vision_head_ablation"], key=lambda r: -abs(r["logit_change"]))[:5]
    print(f"vision heads whose zero-ablation moves logit[{clean_ex.answer}] most: "
          + ", ".join(f"L{r['layer']}H{r['head']} {r['logit_change']:+.2f}" for r in top))
    for note in report["notes"]:
        print(f"note: {note}")

    report["hook_counts"] = _hook_counts(model)
    out = Path(out_dir)
    report["figures"] = _figures(out, clean_ex, corrupt_ex, heat, conf, patching, clean_ex.answer)
    report["seconds"] = round(time.perf_counter() - start, 2)
    _write(report, out)
    print(f"report: {out / 'report.html'} (+ report.json, report.md, {len(report['figures'])} PNGs) "
          f"in {report['seconds']:.1f}s")
    return report


# ---------------------------------------------------------------------- data


def _scenes(seed: int):
    """A colour question about a generated scene, and its corrupted twin: the same scene with the shape in the
    colour another generated scene asks for."""
    from tl_vlm.zoo.data import make_examples, recolour

    examples = make_examples(16, seed, kinds=(KIND,))
    clean = examples[0]
    colour = next(e.answer for e in examples[1:] if e.answer != clean.answer)
    return clean, recolour(clean, colour), examples[1:]


def _first_colour(answer: str) -> str | None:
    """The first colour word of an answer ("The shape is white." -> "white")."""
    from tl_vlm.zoo.data import COLOURS

    return next((w for w in re.findall(r"[a-z]+", answer.lower()) if w in COLOURS), None)


def _jsonable(obj: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.items()}


def _first_token(model, word: str) -> int:
    from tl_vlm.analysis.confidence import object_token_ids

    return object_token_ids(model, word)[0]


# ---------------------------------------------------------------------- fidelity


def _fidelity(model: HookedVLM, image, question: str) -> dict:
    """``verify`` on the demo's own scene and question: the logits' and each language layer's max |diff| vs HF."""
    from tl_vlm.verify import verify

    result = verify(model, images=[image], prompts=[question])
    diffs = [d.max_abs for d in result.layers if d.tower == "language"]
    return {"logits_max_abs_diff": result.logits_max_abs, "hidden_max_abs_diff": diffs,
            "worst_hidden_max_abs_diff": max(diffs)}


# ---------------------------------------------------------------------- patching


def _logit_diff_metric(clean_logits, corrupt_logits, clean_tok: int, corrupt_tok: int):
    def diff(logits) -> float:
        last = logits[0, -1]
        return (last[clean_tok] - (last[corrupt_tok] if corrupt_tok != clean_tok else 0.0)).item()

    clean, corrupt = diff(clean_logits), diff(corrupt_logits)
    scale = clean - corrupt if abs(clean - corrupt) > 1e-6 else 1.0
    return (lambda logits: (diff(logits) - corrupt) / scale), {"clean": clean, "corrupted": corrupt}


def _patch_language(model, clean, corrupt, clean_cache, metric) -> list[float]:
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


def _patch_regions(model, clean, corrupt, clean_cache, image, box, metric) -> dict:
    """Per language layer: patch only the image tokens whose cell overlaps the object's box, then only the others;
    per vision layer: the same with the patches feeding those tokens."""
    from tl_vlm.analysis.spatial import patch_image_region, region_mask, spatial_index

    index = spatial_index(model, clean, [image])
    x0, y0, x1, y1 = box  # inclusive pixel box -> half-open
    inside = region_mask(index, clean.input_ids, 0, (x0, y0, x1 + 1, y1 + 1))
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
    per_token = model.capabilities.patches_per_token
    patches = {True: [], False: []}
    for row in index[index["kind"] == "patch"].itertuples():
        patches[bool(inside[row.batch, row.position])] += [(row.tile, row.patch + k) for k in range(per_token)]
    for key, label in ((True, "vision_resid_pre_object_region"), (False, "vision_resid_pre_rest_of_image")):
        tiles, cols = (torch.tensor(v, device=model.device) for v in zip(*patches[key]))
        out[label] = _patch_vision(model, corrupt, clean_cache, metric, (tiles, cols))
    return out


def _patch_vision(model, corrupt, clean_cache, metric, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
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


def _patch_positions(model, corrupt, clean_cache, metric, notes: list) -> tuple[list | None, list[str]]:
    """The language stream entering each layer patched at one position at a time: [layer, position], with
    TransformerLens' own ``get_act_patch_resid_pre`` (the image rides along in the VLMInputs)."""
    from transformer_lens import patching

    labels = model.to_str_tokens(corrupt.input_ids[0])
    n_pos = corrupt.shape[1]
    if model.cfg.n_layers * n_pos > MAX_POSITION_PATCHES:
        notes.append(f"layer x position patching skipped: {model.cfg.n_layers} x {n_pos} forwards is more than "
                     f"{MAX_POSITION_PATCHES}")
        return None, labels
    with torch.no_grad():
        grid = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, lambda logits: torch.tensor(metric(logits)))
    return grid.tolist(), labels


def _patching_series(p: dict, box: str, rest: str, vision_box: str, vision_rest: str) -> list[tuple[str, list[float]]]:
    """(label, per-layer scores) of each patching experiment that ran; region rows only for patch-based families."""
    series = [("language resid_pre, all image tokens", p["language_resid_pre_at_image_positions"])]
    if "language_resid_pre_object_region" in p:
        series += [(box, p["language_resid_pre_object_region"]), (rest, p["language_resid_pre_rest_of_image"])]
    series.append(("vision resid_pre, whole image", p["vision_resid_pre"]))
    if "vision_resid_pre_object_region" in p:
        series += [(vision_box, p["vision_resid_pre_object_region"]),
                   (vision_rest, p["vision_resid_pre_rest_of_image"])]
    return series


def _print_patching(p: dict, clean_word: str, corrupt_word: str) -> None:
    print(f"activation patching, clean image into the run on the repainted ({corrupt_word}) one; "
          f"1 = '{clean_word}' restored, 0 = corrupted:")
    rows = _patching_series(p, f"  object box only ({p.get('object_region_tokens')}/{p.get('image_tokens')} tokens)",
                            "  rest of the image", "  object box patches only", "  rest of the image")
    width = max(len(r[0]) for r in rows)
    for label, scores in rows:
        print(f"  {label:<{width}}  " + " ".join(f"L{i} {s:+.2f}" for i, s in enumerate(scores)))
    if p["layer_position"] is not None:
        grid = torch.tensor(p["layer_position"])
        layer, pos = divmod(int(grid.abs().argmax()), grid.shape[1])
        print(f"  single position with the largest effect: layer {layer}, position {pos} "
              f"({p['positions'][pos]!r}) {grid[layer, pos].item():+.2f}")


# ---------------------------------------------------------------------- localisation


def _pointing_game(model, examples) -> dict:
    """The peak's hit rate over several scenes (the first is the demo's own), with the mean chance level."""
    from tl_vlm.store.extract import format_prompt

    hits, chance = 0, 0.0
    for ex in examples:
        inputs = model.prepare(images=ex.image, text=format_prompt(model.processor, ex.question))
        record, _, _ = _localize(model, inputs, ex.image, ex.answer, ex.objects[0]["box"], heat=False)
        hits += record["hit"]
        chance += record["chance"]
    return {"scenes": len(examples), "hits": hits, "hit_rate": hits / len(examples), "chance": chance / len(examples)}


def _localize(model, inputs, image, word: str, box, heat: bool = True):
    """Logit-lens p(word) at image tokens; a hit when the peak's patch (BLIP-2: pixel) holds pixels of the drawn
    shape, not merely its bounding box. Returns (record, heat, map)."""
    import numpy as np

    from tl_vlm.analysis.confidence import confidence_map, localization
    from tl_vlm.analysis.spatial import spatial_index
    from tl_vlm.zoo.data import BACKGROUND

    shape = torch.from_numpy((np.asarray(image.convert("RGB")) != BACKGROUND).any(-1))  # [y, x] single-shape scenes
    conf = confidence_map(model, inputs, word)[:, 0].cpu()  # [layer (inputs of each block, then final), image token]
    queries = model.capabilities.queries
    heat = localization(model, inputs, word, [image])[0] if heat or queries else None
    record: dict = {"word": word, "variant": "Jiang et al.: unembed without the final norm, top-50 renormalised",
                    "layers": conf.shape[0], "max_p": conf.max().item()}
    if queries:
        y, x = divmod(int(heat.argmax()), heat.shape[1])
        token = int(conf.amax(0).argmax())
        record["peak"] = {"pixel": [x, y], "token": token, "layer": int(conf[:, token].argmax()),
                          "p": conf[:, token].max().item(), "where": f"pixel ({x}, {y}) via query {token}"}
        record["hit"] = bool(shape[y, x])
        record["chance"] = shape.float().mean().item()
    else:
        index = spatial_index(model, inputs, [image])
        scores = conf.amax(0).clone()
        patch = torch.tensor((index["kind"] == "patch").values)
        scores[~patch] = -1.0
        token = int(scores.argmax())
        cell = index.iloc[token]
        on_shape = [bool(is_patch) and bool(shape[int(r.y0):int(np.ceil(r.y1)), int(r.x0):int(np.ceil(r.x1))].any())
                    for is_patch, r in zip(patch.tolist(), index.itertuples())]
        box_px = [float(cell[k]) for k in ("x0", "y0", "x1", "y1")]
        record["peak"] = {"token": token, "position": int(cell["position"]), "row": int(cell["row"]),
                          "col": int(cell["col"]), "box": box_px, "layer": int(conf[:, token].argmax()),
                          "p": conf[:, token].max().item(),
                          "where": f"image token {token} (cell row {int(cell['row'])}, col {int(cell['col'])}, "
                                   f"pixels {tuple(int(v) for v in box_px)})"}
        record["hit"] = on_shape[token]
        record["chance"] = sum(on_shape) / int(patch.sum())
    record["object_box"] = list(box)
    record["map"] = [[round(v, 5) for v in row] for row in conf.tolist()]
    return record, heat, conf


# ---------------------------------------------------------------------- vision heads


def _ablate_vision_heads(model, inputs, token: int) -> list[dict]:
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


# ---------------------------------------------------------------------- figures and report


def _figures(out: Path, clean_ex, corrupt_ex, heat, conf, patching: dict, word: str) -> dict[str, str]:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import ImageDraw

    from tl_vlm.analysis import viz

    out.mkdir(parents=True, exist_ok=True)
    x0, y0, x1, y1 = clean_ex.objects[0]["box"]

    fig = Figure(figsize=(6, 3.2))
    for k, (ex, title) in enumerate(((clean_ex, "clean"), (corrupt_ex, "corrupted"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(ex.image)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="cyan",
                               linewidth=1.5))
        ax.set_title(f"{title}: {ex.answer}")
        ax.set_axis_off()
    fig.savefig(out / FIGURES["scene"], dpi=120, bbox_inches="tight")

    boxed = clean_ex.image.copy()
    ImageDraw.Draw(boxed).rectangle((x0, y0, x1, y1), outline=(0, 255, 255))
    viz.heatmap_over_image(boxed, heat.numpy(), out / FIGURES["localization"],
                           title=f"logit lens p({word!r}), max over layers; box = object")
    viz.layer_position_map(conf.numpy(), out / FIGURES["confidence_map"], xlabel="image token",
                           ylabel="language layer (input; last = final)", title=f"logit lens p({word!r})")

    fig = Figure(figsize=(9, 3.5))
    panels = {  # x label -> (legend, patching key) per curve; region curves only where region patching ran
        "language layer (resid_pre)": [("all image tokens", "language_resid_pre_at_image_positions"),
                                       ("object box tokens", "language_resid_pre_object_region"),
                                       ("rest of the image", "language_resid_pre_rest_of_image")],
        "vision layer (resid_pre)": [("whole image", "vision_resid_pre"),
                                     ("object box patches", "vision_resid_pre_object_region"),
                                     ("rest of the image", "vision_resid_pre_rest_of_image")],
    }
    for i, (xlabel, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        for (label, key), marker in zip(curves, "osx"):
            if key in patching:
                ax.plot(range(len(patching[key])), patching[key], marker=marker, label=label)
        ax.set_xlabel(xlabel)
        ax.set_xticks(range(len(patching[curves[0][1]])))
        ax.legend(fontsize="small")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6, linestyle=":")
    fig.axes[0].set_ylabel("clean answer restored")
    fig.savefig(out / FIGURES["patching_curves"], dpi=120, bbox_inches="tight")

    figures = {k: v for k, v in FIGURES.items() if k != "patching_layer_position"}
    if patching["layer_position"] is not None:
        grid, labels = patching["layer_position"], patching["positions"]
        fig = Figure(figsize=(min(24, max(6, len(labels) / 5)), 1.5 + 0.5 * len(grid)))
        ax = fig.add_subplot()
        shown = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(shown, ax=ax)
        text_at = [i for i, lab in enumerate(labels) if not _is_image(lab)]
        ax.set_xticks(text_at, [labels[i] for i in text_at], rotation=90, fontsize=6)
        image_at = [i for i, lab in enumerate(labels) if _is_image(lab)]
        if image_at:
            for x in (image_at[0] - 0.5, image_at[-1] + 0.5):
                ax.axvline(x, color="k", linewidth=0.8, linestyle="--")
            ax.text((image_at[0] + image_at[-1]) / 2, 1.01, f"image tokens ({len(image_at)})", ha="center", va="bottom",
                    fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_yticks(range(len(grid)))
        ax.set_ylabel("language layer")
        ax.set_title("clean resid_pre patched at one position (1 = clean answer restored)", pad=14)
        fig.savefig(out / FIGURES["patching_layer_position"], dpi=120, bbox_inches="tight")
        figures["patching_layer_position"] = FIGURES["patching_layer_position"]
    return figures


def _is_image(token: str) -> bool:
    return token in ("<image>", "<|image_pad|>", "<|video_pad|>")


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report, out))


def _patching_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    columns = _patching_series(report["patching"], "object box tokens", "rest of the image",
                               "vision, object box patches", "vision, rest of the image")
    n = max(len(c[1]) for c in columns)
    rows = [[str(i)] + [f"{c[1][i]:+.3f}" if i < len(c[1]) else "" for c in columns] for i in range(n)]
    return ["layer"] + [c[0] for c in columns], rows


def _summary_lines(report: dict) -> list[tuple[str, str]]:
    f, loc, p = report["fidelity"], report["localization"], report["patching"]
    obj = report["scene"]["objects"][0]
    return [
        ("model", f"{report['model']} ({report['architecture']})"),
        ("fidelity vs HF (fp32)", f"max |logit diff| {f['logits_max_abs_diff']:.1e}; language layers "
                                  + ", ".join(f"{d:.1e}" for d in f["hidden_max_abs_diff"])),
        ("scene", f"seed {report['scene']['seed']}: a {obj['colour']} {obj['shape']} at {obj['position']}, "
                  f"box {tuple(obj['box'])}"),
        ("question", report["question"]),
        ("answer", f"{report['answer']!r} (truth {report['truth']!r}: {'right' if report['correct'] else 'wrong'})"),
        ("corrupted image", f"same scene, shape repainted {report['scene']['corrupted']['answer']}"),
        ("patching metric", p["metric"]),
        ("localisation", f"peak of p({loc['word']!r}) at {loc['peak']['where']}, "
                         f"language layer {loc['peak']['layer']}, p={loc['peak']['p']:.2f}: "
                         f"{'HIT' if loc['hit'] else 'MISS'} (chance {loc['chance']:.0%})"),
        ("pointing game", f"{loc['pointing_game']['hits']}/{loc['pointing_game']['scenes']} scenes "
                          f"(chance {loc['pointing_game']['chance']:.0%})"),
        ("hooks per tower", ", ".join(f"{k} {v}" for k, v in report["hook_counts"].items())),
        ("time", f"{report['seconds']:.1f}s"),
    ] + [("note", note) for note in report["notes"]]


def _top_heads(report: dict, n: int = 8) -> list[dict]:
    return sorted(report["vision_head_ablation"], key=lambda r: -abs(r["logit_change"]))[:n]


def _markdown(report: dict) -> str:
    lines = [f"# tl_vlm demo: {report['architecture']}", ""]
    lines += [f"- {k}: {v}" for k, v in _summary_lines(report)]
    head, rows = _patching_rows(report)
    lines += ["", "## Activation patching (clean image into the corrupted run)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Vision heads by zero-ablation effect on the answer logit", "",
              "| layer | head | change |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['logit_change']:+.4f} |" for r in _top_heads(report)]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _html(report: dict, out: Path) -> str:
    e = html.escape

    def table(head, rows):
        return ("<table>" + ("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>" if head else "")
                + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")

    def img(key):
        data = base64.b64encode((out / report["figures"][key]).read_bytes()).decode()
        return (f'<figure><img alt="{e(key)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(key)}</figcaption></figure>")

    head, rows = _patching_rows(report)
    figs = report["figures"]
    verdict = "right" if report["correct"] else "wrong"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>tl_vlm demo: {e(report['model'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:0.5em}img{max-width:100%}"
        ".hit{color:#080;font-weight:bold}.miss{color:#a00;font-weight:bold}</style></head><body>",
        f"<h1>tl_vlm demo: {e(report['architecture'])}</h1>",
        table(None, [[k, v] for k, v in _summary_lines(report)]),
        "<h2>Question and answer</h2>", img("scene"),
        f"<p>Q: <b>{e(report['question'])}</b><br>A: <b>{e(report['answer'])}</b> (truth <b>{e(report['truth'])}</b>, "
        f"<span class='{'hit' if report['correct'] else 'miss'}'>{verdict}</span>)</p>",
        "<h2>Activation patching</h2>", f"<p>{e(report['patching']['metric'])}</p>", table(head, rows),
        img("patching_curves"),
    ]
    if "patching_layer_position" in figs:
        parts.append(img("patching_layer_position"))
    loc = report["localization"]
    hit = "HIT" if loc["hit"] else "MISS"
    heads = [[r["layer"], r["head"], f"{r['logit_change']:+.4f}"] for r in _top_heads(report)]
    parts += [
        "<h2>Logit-lens localisation</h2>",
        f"<p>Peak of p({e(loc['word'])!s}) at {e(loc['peak']['where'])}, language layer {loc['peak']['layer']}, "
        f"p = {loc['peak']['p']:.3f}: <span class='{hit.lower()}'>{hit}</span> "
        f"against the shape (box {e(str(tuple(loc['object_box'])))}) (chance {loc['chance']:.0%}). "
        f"Over {loc['pointing_game']['scenes']} scenes the peak lands on the shape {loc['pointing_game']['hits']} "
        f"times (chance {loc['pointing_game']['chance']:.0%}). Variant: {e(loc['variant'])}.</p>",
        img("localization"), img("confidence_map"),
        "<h2>Vision heads by zero-ablation effect on the answer logit</h2>",
        table(["layer", "head", "logit change"], heads),
        "</body></html>",
    ]
    return "\n".join(parts)
