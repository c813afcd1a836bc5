"""``tl-vlm demo``: the main job, end to end on one model (the biased-world toy LLaVA unless told otherwise).

1. load through ``HookedVLM.from_pretrained`` and check it against HF's own model (``verify``: logits, every layer);
2. draw a scene (``demo.tasks``: on the biased-world toy a held-out scene of ``zoo.world``, the caption's first
   object asked for; on any other model ``zoo.data.make_examples``, the shape's colour), compare ``generate``'s
   answer with the ground truth;
3. activation patching, clean image into a corrupted run. The corrupted image is the same scene with the shape
   repainted in another colour (a minimal pair: same prompt, same geometry, different answer), and the metric is
   the logit difference clean answer - corrupted answer, normalised so 1 = clean answer restored, 0 = corrupted.
   Patched: the language stream entering each layer at all image positions, at the image tokens covering the
   object's box (``analysis.spatial``) and at the other image tokens; the vision residual stream per vision layer;
   and every (layer, position) of the language stream (a layer x position map);
4. logit-lens localisation (``analysis.confidence``): the probability of the answer word at each image token in
   each language layer; a hit when the peak token's patch holds pixels of the drawn shape;
5. zero-ablate each vision head and rank them by their effect on the answer's logit;
   on the biased-world toy, the hallucination story (``demo.hallucination``): hallucination rate of the biased
   object, internal-confidence AUROC, pointing game and ProjectAway on a few held-out scenes;
6. write ``report.json``, PNG figures, ``report.md`` and a self-contained ``report.html``.

Steps 1-5 are ``experiment`` (with ``patching`` and ``localization``), which returns a JSON-ready report dict;
step 6 is ``figures`` and ``report`` (Jinja2 templates under ``templates/``), which read that dict back.

Models whose image tokens are Q-Former queries (BLIP-2), not patches: region patching is skipped and the
localisation spreads each query's score over the patches it cross-attends to (both said in the printed notes).
Encoder-decoder language models (Flan-T5) are not supported here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tl_vlm import HookedVLM
from tl_vlm.demo.experiment import KIND, run_experiment
from tl_vlm.demo.figures import draw_figures
from tl_vlm.demo.hallucination import hallucination_story
from tl_vlm.demo.report import print_summary, write_report
from tl_vlm.demo.tasks import WORLD, task_for

DEFAULT_MODEL = "tl-vlm/toy-llava-bias"

__all__ = ["DEFAULT_MODEL", "run_demo"]


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
    task = task_for(model_name)
    if task is WORLD:
        toy = "toy of a biased world: sky photos always captioned with a bird"
    elif toy_checkpoint(model_name) is not None:
        accuracy = toy_metrics(model_name).get("held_out_accuracy", {}).get(KIND)
        toy = "toy" + (f", held-out {KIND} accuracy {accuracy:.2f}" if accuracy is not None else "")
    print(f"model: {model_name} ({', '.join(x for x in (model.vlm_cfg.architecture, toy) if x)})")
    # Tiny models gain nothing from threads, and on a busy machine OpenMP's spin-waiting makes each of the demo's
    # few hundred forwards many times slower (see tests/conftest.py); big models keep torch's setting.
    threads = torch.get_num_threads()
    if model.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)
    try:
        result = run_experiment(model, model_name, seed, task)
        if task is WORLD:
            result.report["hallucination"] = hallucination_story(model, model_name, seed)
    finally:
        torch.set_num_threads(threads)

    out = Path(out_dir)
    report = result.report
    report["figures"] = draw_figures(out, result)
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_report(report, out)
    print_summary(report, out)
    return report

