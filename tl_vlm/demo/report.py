"""The demo's report, read back from the experiment's dict: the console summary, and ``report.json``,
``report.md`` and ``report.html`` (Jinja2 templates under ``templates/``; the HTML embeds the PNG figures as data
URIs, so the page is one file that can be mailed or attached)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2
import torch

from tl_vlm.demo.hallucination import story_lines

# Autoescape for the HTML only: Markdown has no escaping of its own, and answers and prompts go in verbatim.
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("tl_vlm.demo"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def print_summary(report: dict, out: Path) -> None:
    """The console version of the report, the files' location last."""
    f, loc, game = report["fidelity"], report["localization"], report["localization"]["pointing_game"]
    obj = report["scene"]["objects"][0]
    print(f"fidelity vs HF: max |logit diff| {f['logits_max_abs_diff']:.1e}, "
          f"worst language layer {f['worst_hidden_max_abs_diff']:.1e}")
    print(f"scene (seed {report['scene']['seed']}): {report['scene']['description']}, box {tuple(obj['box'])}")
    print(f"Q: {report['question']}\nA: {report['answer']!r}  (truth: {report['truth']!r}, "
          f"{'right' if report['correct'] else 'wrong'})")
    _print_patching(report["patching"], report["truth"], report["scene"]["corrupted"]["answer"])
    print(f"logit lens: p({report['truth']!r}) at image tokens peaks at {loc['peak']['where']} "
          f"(language layer {loc['peak']['layer']}, p={loc['peak']['p']:.2f}) -> "
          f"{'HIT' if loc['hit'] else 'MISS'} on the shape (box {tuple(obj['box'])}) (chance {loc['chance']:.0%})")
    print(f"  pointing game over {game['scenes']} scenes: {game['hits']}/{game['scenes']} hits "
          f"(chance {game['chance']:.0%})")
    print(f"vision heads whose zero-ablation moves logit[{report['truth']}] most: "
          + ", ".join(f"L{r['layer']}H{r['head']} {r['logit_change']:+.2f}" for r in _top_heads(report, 5)))
    if "hallucination" in report:
        print("the hallucination story (Jiang et al.) on held-out scenes:")
        for label, text in story_lines(report["hallucination"]):
            print(f"  {label}: {text}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"report: {out / 'report.html'} (+ report.json, report.md, {len(report['figures'])} PNGs) "
          f"in {report['seconds']:.1f}s")


def write_report(report: dict, out: Path) -> None:
    """report.json (the dict itself), report.md and the self-contained report.html, next to the figures."""
    out.mkdir(parents=True, exist_ok=True)
    head, rows = _patching_table(report["patching"])
    context = {
        "report": report, "summary": _summary_lines(report), "patching_head": head, "patching_rows": rows,
        "heads": [[r["layer"], r["head"], f"{r['logit_change']:+.4f}"] for r in _top_heads(report, 8)],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(TEMPLATES.get_template("report.md.j2").render(context))
    images = {key: "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode()
              for key, name in report["figures"].items()}
    (out / "report.html").write_text(TEMPLATES.get_template("report.html.j2").render(context, images=images))


def _print_patching(p: dict, clean_word: str, corrupt_word: str) -> None:
    print(f"activation patching, clean image into the run on the corrupted ({corrupt_word}) one; "
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


def _patching_table(p: dict) -> tuple[list[str], list[list[str]]]:
    """The patching series as a table: one row per layer, one column per experiment."""
    columns = _patching_series(p, "object box tokens", "rest of the image", "vision, object box patches",
                               "vision, rest of the image")
    n = max(len(c[1]) for c in columns)
    rows = [[str(i)] + [f"{c[1][i]:+.3f}" if i < len(c[1]) else "" for c in columns] for i in range(n)]
    return ["layer"] + [c[0] for c in columns], rows


def _summary_lines(report: dict) -> list[tuple[str, str]]:
    """(label, text) pairs: the Markdown bullet list and the HTML page's first table."""
    f, loc, p = report["fidelity"], report["localization"], report["patching"]
    obj = report["scene"]["objects"][0]
    return [
        ("model", f"{report['model']} ({report['architecture']})"),
        ("fidelity vs HF (fp32)", f"max |logit diff| {f['logits_max_abs_diff']:.1e}; language layers "
                                  + ", ".join(f"{d:.1e}" for d in f["hidden_max_abs_diff"])),
        ("scene", f"seed {report['scene']['seed']}: {report['scene']['description']}, box {tuple(obj['box'])}"),
        ("question", report["question"]),
        ("answer", f"{report['answer']!r} (truth {report['truth']!r}: {'right' if report['correct'] else 'wrong'})"),
        ("corrupted image", f"same scene, the object drawn as {report['scene']['corrupted']['answer']}"),
        ("patching metric", p["metric"]),
        ("localisation", (f"peak of p({loc['word']!r}) at {loc['peak']['where']}, "
                          f"language layer {loc['peak']['layer']}, p={loc['peak']['p']:.2f}: "
                          f"{'HIT' if loc['hit'] else 'MISS'} (chance {loc['chance']:.0%})")),
        ("pointing game", (f"{loc['pointing_game']['hits']}/{loc['pointing_game']['scenes']} scenes "
                           f"(chance {loc['pointing_game']['chance']:.0%})")),
        ("hooks per tower", ", ".join(f"{k} {v}" for k, v in report["hook_counts"].items())),
        ("time", f"{report['seconds']:.1f}s"),
    ] + (story_lines(report["hallucination"]) if "hallucination" in report else []) + [
        ("note", note) for note in report["notes"]]


def _top_heads(report: dict, n: int) -> list[dict]:
    return sorted(report["vision_head_ablation"], key=lambda r: -abs(r["logit_change"]))[:n]
