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
    debug.add_argument("-d", "--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[debug], help="check a model against HF, answer a question about a generated scene, "
                                       "patch, localise with the logit lens, ablate, write an HTML report")
    demo.add_argument("model", nargs="?", default="tl-vlm/toy-llava-bias",
                      help="checkpoint dir or hub id (default: the biased-world toy LLaVA shipped with the package)")
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
    hooks.add_argument("--hf-names", action="store_true", help="list the HF module names (today's and VLM-Lens's older "
                       "spelling) with the hook point or module holding the same output")

    extract = sub.add_parser("extract", parents=[debug], help="extract hook activations to a VLM-Lens-compatible SQLite store")
    extract.add_argument("config", nargs="?", help="YAML config (VLM-Lens keys plus batch_size, float16, dtype, device)")
    # VLM-Lens's flags (src/main.py), so its commands run unchanged
    extract.add_argument("-c", "--config", dest="config_flag", metavar="CONFIG", help="the YAML config (VLM-Lens's form)")
    extract.add_argument("-a", "--architecture", help="architecture name stored in the DB (default: the model's family)")
    extract.add_argument("-m", "--model-path", dest="model_path", help="checkpoint folder (overrides model_path)")
    extract.add_argument("-i", "--input-dir", dest="input_dir", help="folder of images (overrides input_dir)")
    extract.add_argument("-o", "--output-db", dest="output_db")
    extract.add_argument("-l", "--log-named-modules", "--log_named_modules", dest="log_named_modules", action="store_true",
                         help="print the model's HF module names with their hook equivalents and stop")
    extract.add_argument("--download-path", help=argparse.SUPPRESS)
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

    explore = sub.add_parser("explore", parents=[debug], help="a local web explorer: attention, logit lens, patching by "
                             "region, head ablations (needs pip install 'tl-vlm[explore]')")
    explore.add_argument("model", nargs="?", default="tl-vlm/toy-llava")
    explore.add_argument("--port", type=int, default=7860, help="another free port is used if this one is taken")
    explore.add_argument("--host", default="127.0.0.1")
    explore.add_argument("--device", default=None)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from tl_vlm.demo import run_demo

        run_demo(args.model, args.out, args.device, seed=args.seed)
    elif args.command == "hooks":
        _hooks(args.model, args.filter, args.shapes, args.device, args.dtype, args.hf_names)
    elif args.command == "extract":
        from tl_vlm.store import ExtractConfig, extract

        if args.download_path is not None:
            raise ValueError("--download-path: tl_vlm never downloads a model; give a local checkpoint as -m / model_path")
        if args.config and args.config_flag and args.config != args.config_flag:
            raise ValueError(f"two configs given ({args.config} and -c {args.config_flag}); give one")
        config_path = args.config or args.config_flag
        keys = ("output_db", "batch_size", "pooling_method", "modules", "device", "float16", "architecture", "model_path",
                "input_dir")
        overrides = {k: getattr(args, k) for k in keys}
        if args.log_named_modules:
            model_path = args.model_path or (ExtractConfig.raw_yaml(config_path).get("model_path") if config_path else None)
            if model_path is None:
                raise ValueError("-l needs the model: give -m MODEL_PATH or a config with model_path")
            _hooks(model_path, None, False, args.device, "fp32", hf_names=True)
            return 0
        if config_path is None:
            raise ValueError("give the config: tl-vlm extract -c CONFIG.yaml (or tl-vlm extract CONFIG.yaml)")
        counts = extract(ExtractConfig.from_yaml(config_path, **overrides), trust_remote_code=args.trust_remote_code)
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
    elif args.command == "explore":
        try:
            from tl_vlm.explore.app import serve
        except ModuleNotFoundError as err:
            raise ValueError(f"the explorer needs {err.name}: pip install 'tl-vlm[explore]'") from None
        serve(args.model, args.host, args.port, args.device)
    return 0


def _hooks(model_name: str, name_filter: str | None, shapes: bool, device: str | None, dtype: str,
           hf_names: bool = False) -> None:
    import re

    from tl_vlm import HookedCLIP
    from tl_vlm.dtypes import DTYPES
    from tl_vlm.loading import load_model

    model = load_model(model_name, device=device, dtype=DTYPES[dtype])
    pattern = re.compile(name_filter) if name_filter else None
    if hf_names:
        _print_hf_names(model, pattern)
        return
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


def _print_hf_names(model, pattern) -> None:
    """HF module (today) | the same module in transformers < 4.52 (VLM-Lens configs) | what holds its output here."""
    from tl_vlm.hf_names import hf_names, is_module_target

    rows = [e for e in hf_names(model) if pattern is None or any(pattern.search(s) for s in (*e.spellings(), e.target))]
    width = max((len(e.name) for e in rows), default=0)
    older = max((len(e.legacy or "") for e in rows), default=0)
    print(f"{'HF module':{width}s}  {'older transformers':{older}s}  tl_vlm")
    for e in rows:
        what = f"{e.target} (module output)" if is_module_target(model, e.target) else e.target
        print(f"{e.name:{width}s}  {e.legacy or '=':{older}s}  {what}")


if __name__ == "__main__":
    sys.exit(main())
