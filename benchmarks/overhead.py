"""Hook overhead of HookedVLM vs HF on the same LLaVA weights and inputs, as ratios to HF (default attention).

Usage: python benchmarks/overhead.py [--shape design] [--repeats 15] [--threads 2] [--device cpu] [--dtype fp32]
Writes benchmarks/results/overhead_<shape>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from common import interleaved, llava_inputs, llava_model, write_report
from tl_vlm import HookedVLM

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="design")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--generate", type=int, default=32, help="new tokens for the generate row (0 to skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)

    hf = llava_model(args.shape).to(device=device, dtype=dtype)
    model = HookedVLM.from_hf_model(hf)  # shares hf's weights
    hf_eager = llava_model(args.shape).to(device=device, dtype=dtype)
    hf_eager.set_attn_implementation("eager")
    inputs = {k: v.to(device) for k, v in llava_inputs(hf.config).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    head = lambda z, hook: z.index_fill_(2, torch.tensor([0], device=z.device), 0.0)  # noqa: E731

    # VLM-Lens style: plain PyTorch forward hooks on every HF layer, outputs saved.
    saved = []
    layers = list(hf.model.language_model.layers) + list(hf.model.vision_tower.encoder.layers)

    def vlm_lens_style():
        handles = [m.register_forward_hook(lambda mod, i, o: saved.append(o.detach())) for m in layers]
        hf(**inputs)
        for h in handles:
            h.remove()
        saved.clear()

    def timed(fn):
        def run():
            with torch.no_grad():
                fn()
            sync()
        return run

    runs = {
        "hf (sdpa)": timed(lambda: hf(**inputs)),
        "hf eager": timed(lambda: hf_eager(**inputs)),
        "tl_vlm forward": timed(lambda: model(**inputs)),
        "tl_vlm run_with_cache all": timed(lambda: model.run_with_cache(**inputs)),
        "tl_vlm run_with_cache resid": timed(lambda: model.run_with_cache(**inputs, names_filter=resid)),
        "tl_vlm run_with_hooks 1 ablation": timed(
            lambda: model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.attn.hook_z", head)])
        ),
        "vlm-lens-style hooks (hf)": timed(vlm_lens_style),
    }
    bridge = _bridge(llava_model(args.shape).to(device=device, dtype=dtype))
    if bridge is not None:
        bridge_inputs = dict(inputs)
        runs["tl bridge forward"] = timed(lambda: bridge(bridge_inputs["input_ids"], pixel_values=bridge_inputs["pixel_values"]))
        runs["tl bridge run_with_cache all"] = timed(
            lambda: bridge.run_with_cache(bridge_inputs["input_ids"], pixel_values=bridge_inputs["pixel_values"])
        )
    if args.generate:
        gen = dict(max_new_tokens=args.generate, do_sample=False)
        eos = dict(eos_token_id=None, pad_token_id=0)
        runs["hf generate"] = timed(lambda: hf.generate(**inputs, **gen, min_new_tokens=args.generate, **eos))
        runs["tl_vlm generate"] = timed(lambda: model.generate(inputs, **gen, eos_token_id=[]))

    results = interleaved(runs, args.repeats)
    base = results["hf (sdpa)"]["median_s"]
    gen_base = results.get("hf generate", {}).get("median_s")
    rows = []
    for name, r in results.items():
        ref = gen_base if "generate" in name else base
        rows.append({"run": name, "median_ms": 1e3 * r["median_s"], "iqr_ms": 1e3 * r["iqr_s"], "ratio_to_hf": r["median_s"] / ref})
    meta = {
        "shape": args.shape, "device": str(device), "dtype": args.dtype, "threads": args.threads,
        "tokens": int(inputs["input_ids"].shape[1]), "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    write_report(f"overhead_{args.shape}_{device.type}_{args.dtype}", rows, meta, Path(__file__).parent / "results")


def _bridge(hf):
    """TransformerLens' own bridge around an in-memory copy (it rewires the model it wraps)."""
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        return build_bridge_from_module(hf, "LlavaForConditionalGeneration", hf_config=hf.config)
    except Exception as err:  # optional peer; report and go on without it
        print(f"TransformerLens bridge unavailable here: {type(err).__name__}: {str(err)[:200]}")
        return None


if __name__ == "__main__":
    main()
