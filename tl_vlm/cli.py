"""The ``tl-vlm`` command."""

from __future__ import annotations

import argparse
import sqlite3
import sys

import yaml

# Errors a user causes and can fix (a bad path, config, input or checkpoint): print the message, no traceback.
EXPECTED = (ValueError, OSError, NotImplementedError, KeyError, sqlite3.Error, yaml.YAMLError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except EXPECTED as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tl-vlm {args.command}: error: {message} ({type(err).__name__}; --debug shows the traceback)",
              file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-vlm", description="TransformerLens for vision-language models")
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before the subcommand.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[debug], help="check a model against HF, answer a question about a generated scene, "
                                       "patch, localise with the logit lens, ablate, write an HTML report")
    demo.add_argument("model", nargs="?", default="tl-vlm/toy-llava",
                      help="checkpoint dir or hub id (default: the trained toy LLaVA shipped with the package)")
    demo.add_argument("--out", default="tl_vlm_demo", help="folder for report.html, report.json, report.md and PNGs")
    demo.add_argument("--device", default=None)
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated scene")

    hooks = sub.add_parser("hooks", parents=[debug], help="list a model's hook names (with --shapes: their shapes on a sample input)")
    hooks.add_argument("model")
    hooks.add_argument("--filter", default=None, help="regular expression on hook names")
    hooks.add_argument("--shapes", action="store_true", help="run a generated image and prompt and print each shape")
    hooks.add_argument("--device", default=None)
    hooks.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights' dtype (a 7B model "
                       "needs 28 GB in fp32)")

    extract = sub.add_parser("extract", parents=[debug], help="extract hook activations to a VLM-Lens-compatible SQLite store")
    extract.add_argument("config", help="YAML config (VLM-Lens keys plus batch_size, float16, dtype, device)")
    extract.add_argument("--output-db", dest="output_db")
    extract.add_argument("--batch-size", dest="batch_size", type=int)
    extract.add_argument("--pooling", dest="pooling_method")
    extract.add_argument("--modules", nargs="+", help="regular expressions or globs over hook names")
    extract.add_argument("--device")
    extract.add_argument("--float16", action="store_true", default=None, help="store tensors as float16")
    extract.add_argument("--trust-remote-code", action="store_true",
                         help="allow code shipped with the checkpoint to run (a config file alone cannot allow it)")

    verify = sub.add_parser("verify", parents=[debug], help="check a converted checkpoint against HF, tower by tower and layer by layer")
    verify.add_argument("model")
    verify.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="fp16/bf16: compared with HF in that dtype (0 = bit for bit), HF in fp32 reported apart")
    verify.add_argument("--device", default=None)
    verify.add_argument("--max-new-tokens", type=int, default=8)
    verify.add_argument("--out", default=None, help="folder for verify.json and verify.md")
    verify.add_argument("--no-fp32-reference", action="store_true", help="skip the fp32 HF run in fp16/bf16")

    merge = sub.add_parser("merge", parents=[debug], help="merge shard stores into one without duplicates")
    merge.add_argument("target")
    merge.add_argument("sources", nargs="+")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from tl_vlm.demo import run_demo

        run_demo(args.model, args.out, args.device, seed=args.seed)
    elif args.command == "hooks":
        _hooks(args.model, args.filter, args.shapes, args.device, args.dtype)
    elif args.command == "extract":
        from tl_vlm.store import ExtractConfig, extract

        overrides = {k: getattr(args, k) for k in ("output_db", "batch_size", "pooling_method", "modules", "device", "float16")}
        counts = extract(ExtractConfig.from_yaml(args.config, **overrides), trust_remote_code=args.trust_remote_code)
        print(f"extracted {counts['done']} samples, {counts['skipped']} already stored, {counts['failed']} failed (see errors table)")
        return 1 if counts["failed"] else 0
    elif args.command == "verify":
        from tl_vlm.verify import verify

        report = verify(args.model, dtype=args.dtype, device=args.device, max_new_tokens=args.max_new_tokens,
                        reference_fp32=not args.no_fp32_reference)
        print(report.table())
        if args.out:
            report.write(args.out)
        return 0 if report.passed else 1
    elif args.command == "merge":
        from tl_vlm.store import merge

        print(f"merged {merge(args.target, args.sources)} tensor rows into {args.target}")
    return 0


def _hooks(model_name: str, name_filter: str | None, shapes: bool, device: str | None, dtype: str) -> None:
    import re

    from tl_vlm import HookedCLIP
    from tl_vlm.dtypes import DTYPES
    from tl_vlm.loading import load_model

    model = load_model(model_name, device=device, dtype=DTYPES[dtype])
    pattern = re.compile(name_filter) if name_filter else None
    names = [n for n in model.hook_dict if pattern is None or pattern.search(n)]
    if not shapes:
        print("\n".join(names))
        return
    from tl_vlm.prompts import format_prompt
    from tl_vlm.zoo.data import sample_images

    dual = isinstance(model, HookedCLIP)  # a dual encoder takes a caption, not a prompt with an image placeholder
    inputs = model.prepare(images=sample_images(1), text="a photo" if dual else format_prompt(model.processor, "Describe the image."))
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(inputs, names_filter=names)
    for name in names:
        print(f"{name:50s} {tuple(cache[name].shape) if name in cache else 'not run on this input'}")


if __name__ == "__main__":
    sys.exit(main())
