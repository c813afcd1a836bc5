"""Hook overhead of HookedVLM and its peers vs HF on the same weights and inputs, as ratios to HF (default attention).

Usage: python benchmarks/overhead.py --family llava|blip2|qwen2_vl --shape tiny|design|real
           [--repeats 9] [--warmup 1] [--threads 2] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--generate 32]
Writes benchmarks/results/overhead_<family>_<shape>_<device>_<dtype>.{json,md}.

Every model here shares one set of weights (HookedVLM.from_hf_model and common.sibling make views, not
copies). Peers: TransformerLens' TransformerBridge (where it supports the family), nnsight (if installed)
saving every block's output, and a VLM-Lens-style loop (register_forward_hook on every block, outputs kept).
"""

from __future__ import annotations

import argparse
import platform

import torch

from common import DTYPES, FAMILIES, SHAPES, block_modules, build, inputs_for, interleaved, sibling, write_report
from tl_vlm import CacheArena, HookedVLM

BRIDGE_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration",
                        "qwen2_vl": "Qwen2VLForConditionalGeneration"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="design", choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--generate", type=int, default=32, help="new tokens for the generate rows (0 to skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)

    hf, processor = build(args.family, args.shape)
    hf.to(device=device, dtype=dtype)
    model = HookedVLM.from_hf_model(hf)
    hf_eager = sibling(hf)
    hf_eager.set_attn_implementation("eager")
    inputs = inputs_for(processor, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            with torch.no_grad():
                out = fn()
            sync()
            return out
        return run

    arena = CacheArena()  # opt-in storage reused across the rounds (each run overwrites the previous cache)
    resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    ablate = lambda z, hook: z.index_fill_(2, torch.tensor([0], device=z.device), 0.0)  # noqa: E731
    runs = {
        "hf (default attention)": timed(lambda: hf(**inputs)),
        "hf eager": timed(lambda: hf_eager(**inputs)),
        "tl_vlm forward": timed(lambda: model(**inputs)),
        "tl_vlm run_with_cache all": timed(lambda: model.run_with_cache(**inputs)),
        "tl_vlm run_with_cache resid_post": timed(lambda: model.run_with_cache(**inputs, names_filter=resid)),
        "tl_vlm run_with_cache all, arena": timed(lambda: model.run_with_cache(**inputs, arena=arena)),
        "tl_vlm run_with_cache resid_post pos_slice=-1": timed(
            lambda: model.run_with_cache(**inputs, names_filter=resid, pos_slice=-1)
        ),
        # To the CPU: from a GPU through pinned non-blocking copies; on the CPU itself a no-op move.
        "tl_vlm run_with_cache all device=cpu": timed(lambda: model.run_with_cache(**inputs, device="cpu")),
        "tl_vlm run_with_hooks 1 ablation": timed(
            lambda: model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_z", ablate)])
        ),
        "vlm-lens-style hooks (hf)": timed(_vlm_lens_style(sibling(hf), inputs)),
    }
    skipped = {}
    for name, fn in (("tl bridge", _bridge), ("nnsight", _nnsight)):
        try:
            runs.update({f"{name} {row}": timed(f) for row, f in fn(args.family, sibling(hf), inputs).items()})
        except Exception as err:  # an optional peer: report why its rows are missing and go on
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(f"{name} rows skipped: {skipped[name]}")
    lengths = {}
    if args.generate:
        n = args.generate
        settings = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def record(name, fn):
            def run():
                lengths[name] = int(fn().shape[-1] - inputs["input_ids"].shape[-1])
            return run

        runs["hf generate"] = timed(record("hf", lambda: hf.generate(**inputs, **settings, eos_token_id=None, pad_token_id=0)))
        runs["tl_vlm generate"] = timed(record("tl_vlm", lambda: model.generate(inputs, **settings, eos_token_id=[])))

    results = interleaved(runs, args.repeats, warmup=args.warmup)
    rows = []
    for name, r in results.items():
        ref = results["hf generate" if "generate" in name else "hf (default attention)"]
        rows.append({"run": name, "median_ms": 1e3 * r["median_s"], "iqr_ms": 1e3 * r["iqr_s"],
                     "ratio_to_hf": r["median_s"] / ref["median_s"], "iqr_ratio": r["iqr_s"] / ref["median_s"],
                     "min_ratio": r["min_s"] / ref["min_s"]})
    meta = {
        "family": args.family, "shape": args.shape, "device": str(device), "dtype": args.dtype, "threads": args.threads,
        "tokens": int(inputs["input_ids"].shape[1]), "params_m": sum(p.numel() for p in hf.parameters()) / 1e6,
        "repeats": args.repeats, "generated_tokens": lengths, "skipped": skipped, "torch": torch.__version__,
        "hf_attention": hf.config._attn_implementation, "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    write_report(f"overhead_{args.family}_{args.shape}_{device.type}_{args.dtype}", rows, meta)


def _vlm_lens_style(hf, inputs):
    """VLM-Lens: plain forward hooks on every block of every tower, each output kept (batch 1)."""
    saved = []
    for _, block in block_modules(hf):
        block.register_forward_hook(lambda mod, i, o: saved.append((o[0] if isinstance(o, tuple) else o).detach()))

    def run():
        hf(**inputs)
        saved.clear()
    return run


def _bridge(family, hf, inputs) -> dict:
    """TransformerLens' TransformerBridge wrapping the in-memory model (it rewires it: a sibling is passed)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    bridge = build_bridge_from_module(hf, BRIDGE_ARCHITECTURES[family], hf_config=hf.config)
    ids, rest = inputs["input_ids"], {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        bridge(ids, **rest)  # fail here, not in the timing loop, where the bridge cannot run the family
    return {"forward": lambda: bridge(ids, **rest), "run_with_cache all": lambda: bridge.run_with_cache(ids, **rest)}


def _nnsight(family, hf, inputs) -> dict:
    """nnsight tracing the HF model, saving every block's output (the residual streams)."""
    from nnsight import NNsight

    traced = NNsight(hf)
    envoys = []
    for name, _ in block_modules(hf):
        envoy = traced
        for part in name.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        envoys.append(envoy)

    def run():
        saved = []  # created outside the block: nnsight runs the block's body in its own frame
        with traced.trace(**inputs):
            for envoy in envoys:
                saved.append(envoy.output.save())
        return saved
    return {"trace, save block outputs": run}


if __name__ == "__main__":
    main()
