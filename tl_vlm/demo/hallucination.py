"""The demo's hallucination story, on the biased-world toy: Jiang et al.'s measurements (``zoo.world_metrics``) on a
few held-out scenes (half of them sky without a bird), next to the toy's training record (120 held-out scenes,
tl_vlm's numbers and an HF-only reference's)."""

from __future__ import annotations

from tl_vlm import HookedVLM
from tl_vlm.zoo import world_metrics
from tl_vlm.zoo.toys import toy_metrics

N_SCENES = 8


def hallucination_story(model: HookedVLM, model_name: str, seed: int) -> dict:
    scenes = world_metrics.held_out(N_SCENES, seed)
    live = world_metrics.measure(model, scenes)
    live["scenes"] = [{"drawn": sorted(s.objects), "background": s.background, "caption": c}
                      for s, c in zip(scenes, live.pop("captions"))]
    return {"live": live, "stored": toy_metrics(model_name).get("held_out_phenomena")}


def story_lines(story: dict) -> list[tuple[str, str]]:
    """(label, text) per measurement: live on the demo's scenes, then the stored 120-scene numbers (tl_vlm / HF)."""
    def numbers(m: dict) -> dict[str, str]:
        h, c, p, e = (m[k] for k in ("hallucination", "confidence", "pointing", "project_away_at_input"))
        paper = m["project_away"]
        return {
            "hallucinated bird": f"{h['bird_on_sky_without_bird']:.0%} of sky-without-bird captions "
                                 f"(other absent objects {h['other_objects_mean']:.0%})",
            "internal confidence": f"AUROC {c['auroc']:.2f} real vs hallucinated ({c['mentions']} mentions, "
                                   f"{c['hallucinated']} hallucinated)",
            "pointing game": f"{p['accuracy']:.0%} of {p['objects']} objects (chance {p['chance']:.0%})",
            "ProjectAway": (f"at the LM input: {_rate(e['removed'])} of {e['hallucinated_mentions']} hallucinations "
                            f"removed, {_rate(e['kept'])} of correct kept; after layer {paper['image_layer']} "
                            f"(paper's hook): {_rate(paper['removed'])} removed"),
        }

    lines = [(f"{k} ({len(story['live']['scenes'])} scenes)", v) for k, v in numbers(story["live"]).items()]
    stored = story["stored"]
    if stored:
        ours, ref = numbers(stored["tl_vlm"]), numbers(stored["reference_hf"])
        lines += [(f"{k} ({stored['scenes']} scenes, tl_vlm | HF reference)", f"{ours[k]} | {ref[k]}") for k in ours]
    return lines


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
