"""``tl-vlm demo``: the main job, end to end on one model (the tiny LLaVA fixture unless told otherwise).

1. load through ``HookedVLM.from_pretrained`` and check it against HF's own model (logits, every layer);
2. answer a question about a generated image with ``generate``;
3. activation patching over images: clean vs. corrupted image, resid_pre of each language layer patched
   at the image positions, and the vision tower's residual stream patched per vision layer;
4. zero-ablate each vision head and rank them by their effect on the answer;
5. write ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tl_vlm import HookedVLM, VLMInputs

QUESTION = "What is the colour of the shape?"


def run_demo(model_name: str | None, out_dir: str, device: str | None) -> dict:
    from tl_vlm.zoo.tiny import build_tiny_vlm, sample_images

    start = time.perf_counter()
    if model_name is None:
        cache_dir = Path.home() / ".cache" / "tl_vlm" / "tiny" / "llava15"
        model_name = str(build_tiny_vlm(cache_dir, "llava15"))
        print(f"model: tiny random-init LLaVA-1.5 fixture at {model_name} (answers are noise until the toy zoo lands)")
    model = HookedVLM.from_pretrained(model_name, device=device)
    report: dict = {"model": model_name, "architecture": model.vlm_cfg.architecture}

    if "decoder" in model.towers():
        raise NotImplementedError("the demo runs decoder-only language models; use tl_vlm.verify for Flan-T5 checkpoints")
    from tl_vlm.store.extract import format_prompt

    prompt = format_prompt(model.processor, QUESTION)
    clean_image, corrupt_image = sample_images(2, seed=7)
    clean = model.prepare(images=clean_image, text=prompt)
    corrupt = model.prepare(images=corrupt_image, text=prompt)
    report["fidelity"] = _fidelity(model, model_name, clean)
    print(f"fidelity vs HF: max |logit diff| {report['fidelity']['logits_max_abs_diff']:.2e}, "
          f"worst layer {report['fidelity']['worst_hidden_max_abs_diff']:.2e}")

    answer = model.generate(clean, max_new_tokens=8)
    report["answer"] = model.to_string(answer[0, clean.shape[1]:])
    report["image"] = dict(clean_image.info)
    print(f"Q: {QUESTION!r}  image: {clean_image.info}\nA: {report['answer']!r}")

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        corrupt_logits = model(corrupt)
    answer_token = int(clean_logits[0, -1].argmax())
    metric = _logit_diff_metric(clean_logits, corrupt_logits, answer_token)
    report["patching"] = {
        "answer_token": model.to_str_tokens(torch.tensor([answer_token]))[0],
        "language_resid_pre_at_image_positions": _patch_language(model, clean, corrupt, clean_cache, metric),
        "vision_resid_pre": _patch_vision(model, corrupt, clean_cache, metric),
    }
    print("patching (1 = clean behaviour restored):")
    for tower, scores in report["patching"].items():
        if isinstance(scores, list):
            print(f"  {tower}: " + " ".join(f"{s:+.2f}" for s in scores))

    report["vision_head_ablation"] = _ablate_vision_heads(model, clean, answer_token)
    top = sorted(report["vision_head_ablation"], key=lambda r: -abs(r["logit_change"]))[:5]
    print("vision heads with the largest effect on the answer logit: "
          + ", ".join(f"L{r['layer']}H{r['head']} {r['logit_change']:+.3f}" for r in top))
    report["hook_counts"] = _hook_counts(model)
    report["seconds"] = time.perf_counter() - start
    _write(report, Path(out_dir))
    print(f"report: {Path(out_dir) / 'report.md'}  ({report['seconds']:.1f}s)")
    return report


def _fidelity(model: HookedVLM, model_name: str, inputs: VLMInputs) -> dict:
    from transformers import AutoModelForImageTextToText

    from tl_vlm.verify import _hf_run

    hf = AutoModelForImageTextToText.from_pretrained(model_name).to(model.device).eval()
    hf_logits, hf_layers = _hf_run(model, hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
    diffs = [(cache[f"blocks.{i}.hook_resid_post"] - h).abs().max().item() for i, h in enumerate(hf_layers["language"])]
    return {"logits_max_abs_diff": (logits - hf_logits).abs().max().item(), "hidden_max_abs_diff": diffs,
            "worst_hidden_max_abs_diff": max(diffs)}


def _logit_diff_metric(clean_logits, corrupt_logits, token: int):
    clean, corrupt = clean_logits[0, -1, token].item(), corrupt_logits[0, -1, token].item()
    scale = clean - corrupt if abs(clean - corrupt) > 1e-6 else 1.0
    return lambda logits: (logits[0, -1, token].item() - corrupt) / scale


def _patch_language(model, clean, corrupt, clean_cache, metric) -> list[float]:
    image = model.image_token_mask(corrupt.input_ids)
    if not torch.equal(image, model.image_token_mask(clean.input_ids)):
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


def _patch_vision(model, corrupt, clean_cache, metric) -> list[float]:
    scores = []
    for layer in range(model.vision.cfg.n_layers):
        name = f"vision.blocks.{layer}.hook_resid_pre"
        with torch.no_grad():
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda resid, hook, n=name: clean_cache[n])])
        scores.append(metric(logits))
    return scores


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
        tower = name.split(".")[0] if name.split(".")[0] in ("vision", "projector") else "language"
        counts[tower] = counts.get(tower, 0) + 1
    return counts


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    f = report["fidelity"]
    lines = [
        f"# tl_vlm demo: {report['architecture']}",
        f"model: `{report['model']}`",
        "",
        f"- fidelity vs HF (fp32): max |logit diff| {f['logits_max_abs_diff']:.2e}; per layer "
        + ", ".join(f"{d:.1e}" for d in f["hidden_max_abs_diff"]),
        f"- answer to `{QUESTION!r}`: `{report['answer']}` (image: {report['image']})",
        f"- hooks per tower: {report['hook_counts']}",
        "",
        f"## Activation patching (clean image into corrupted run; answer token `{report['patching']['answer_token']}`)",
        "",
        "| layer | language resid_pre @ image positions | vision resid_pre |",
        "|---|---|---|",
    ]
    lang, vis = report["patching"]["language_resid_pre_at_image_positions"], report["patching"]["vision_resid_pre"]
    for i in range(max(len(lang), len(vis))):
        cell = lambda xs: f"{xs[i]:+.3f}" if i < len(xs) else ""  # noqa: E731
        lines.append(f"| {i} | {cell(lang)} | {cell(vis)} |")
    lines += ["", "## Vision head zero-ablation (change of the answer logit)", "", "| layer | head | change |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['head']} | {r['logit_change']:+.4f} |" for r in report["vision_head_ablation"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
