"""The ``tl-vlm`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-vlm", description="TransformerLens for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load a model, answer a question about an image, patch, ablate, report")
    demo.add_argument("model", nargs="?", default=None, help="checkpoint dir or hub id (default: the tiny LLaVA fixture)")
    demo.add_argument("--out", default="tl_vlm_demo", help="folder for report.json and report.md")
    demo.add_argument("--device", default=None)

    hooks = sub.add_parser("hooks", help="list a model's hook names with their towers")
    hooks.add_argument("model")
    hooks.add_argument("--filter", default=None, help="regular expression on hook names")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from tl_vlm.demo import run_demo

        run_demo(args.model, args.out, args.device)
    elif args.command == "hooks":
        import re

        from tl_vlm import HookedVLM

        model = HookedVLM.from_pretrained(args.model)
        pattern = re.compile(args.filter) if args.filter else None
        for name in model.hook_dict:
            if pattern is None or pattern.search(name):
                print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
