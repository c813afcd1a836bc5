"""One model split over devices vs the same model on one device: equal results, and what the split costs.

Runs every placement a machine allows on the saved benchmark checkpoint of a family: whole on cuda:0 (the
reference), cuda:0 + cpu (blocks past the middle on CPU), two GPUs (n_devices=2, when present), and the blocks
offloaded to CPU memory and streamed to cuda:0. Each row: max abs diff of the logits and of every cached residual
stream against the reference, greedy generation equal or not, and forward / generate time as ratios to the
reference. Usage: python benchmarks/placement.py --family llava --shape design --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import inputs_for, interleaved, save_checkpoint, write_report  # noqa: E402

from tl_vlm import HookedVLM  # noqa: E402
from tl_vlm.placement import placement_units  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=["llava", "blip2", "qwen2_vl"])
    parser.add_argument("--shape", default="design", choices=["tiny", "design", "real"])
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("placement.py needs a CUDA device (the CPU tests cover the planning and the boundaries)")
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(args.family, args.shape, Path(tmp) / args.family)
        reference = HookedVLM.from_pretrained(path, device="cuda:0", dtype=dtype)
        units = list(placement_units(reference))
        blocks = [u for u in units if u.startswith("blocks.")]
        half = {u: "cpu" for u in blocks[len(blocks) // 2:] + ["ln_final", "unembed"]}
        placements = {"cuda:0+cpu": dict(device_map={"": "cuda:0", **half})}
        if torch.cuda.device_count() >= 2:
            placements["2 GPUs"] = dict(n_devices=2)
        placements["offload blocks"] = dict(device="cuda:0", offload_blocks=True)
        inputs = inputs_for(reference.processor, "cuda:0", dtype)
        names = lambda n: n.endswith("hook_resid_post")  # noqa: E731
        with torch.no_grad():
            expected, expected_cache = reference.run_with_cache(inputs, names_filter=names)
        expected_tokens = reference.generate(inputs, max_new_tokens=8, do_sample=False)
        rows = []
        for label, kwargs in placements.items():
            model = HookedVLM.from_pretrained(path, dtype=dtype, **kwargs)
            with torch.no_grad():
                logits, cache = model.run_with_cache(inputs, names_filter=names)
            resid = max((cache[k].to("cuda:0") - expected_cache[k]).abs().max().item() for k in expected_cache.keys())
            same = torch.equal(model.generate(inputs, max_new_tokens=8, do_sample=False), expected_tokens)

            def sync(fn):
                return lambda: (fn(), torch.cuda.synchronize())

            with torch.no_grad():
                timing = interleaved({
                    "ref": sync(lambda: reference(inputs)), "split": sync(lambda: model(inputs)),
                    "ref_gen": sync(lambda: reference.generate(inputs, max_new_tokens=8, do_sample=False)),
                    "split_gen": sync(lambda: model.generate(inputs, max_new_tokens=8, do_sample=False)),
                }, args.repeats)
            rows.append({
                "placement": label, "logits_max_diff": (logits - expected).abs().max().item(), "resid_max_diff": resid,
                "generate_equal": same, "forward_ratio": timing["split"]["median_s"] / timing["ref"]["median_s"],
                "generate_ratio": timing["split_gen"]["median_s"] / timing["ref_gen"]["median_s"],
                "devices": sorted({str(d) for d in model.device_map.values()}),
            })
            del model
            torch.cuda.empty_cache()
    write_report(f"placement_{args.family}_{args.shape}_{args.dtype}", rows,
                 {"family": args.family, "shape": args.shape, "dtype": args.dtype, "gpus": torch.cuda.device_count()})


if __name__ == "__main__":
    main()
