"""Every python snippet the README shows runs, in order, on the bundled toys (offline): hub checkpoints and the
layer numbers of a 7B model are swapped for the toy's, and the names a snippet leaves to the reader are given."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import tl_vlm
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo import data

README = Path(__file__).resolve().parents[1] / "README.md"
# Real checkpoints and their depths -> the toy's.
TOY = {
    '"llava-hf/llava-1.5-7b-hf", device="cuda", dtype=torch.float16': '"tl-vlm/toy-llava"',
    '"llava-hf/llava-1.5-7b-hf"': '"tl-vlm/toy-llava"',
    "blocks.10.": "blocks.1.",
    "vision.blocks.5.": "vision.blocks.2.",
}


def snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    for real, toy in TOY.items():
        blocks = [block.replace(real, toy) for block in blocks]
    return blocks


def _reader_names() -> dict:
    """What the README leaves to the reader: an image, a prompt, clean/corrupt inputs, a metric, a hook."""
    model = tl_vlm.HookedVLM.from_pretrained("tl-vlm/toy-llava")
    examples = data.make_examples(2, seed=0, kinds=("colour",))
    prompt = format_prompt(model.processor, "What colour is the shape?")
    clean, corrupt = (model.prepare(images=ex.image, text=prompt) for ex in examples)
    return {
        "image": examples[0].image, "prompt": prompt, "processor": model.processor, "clean": clean, "corrupt": corrupt,
        "metric": lambda logits: logits[0, -1].log_softmax(-1).max(),
        "ablate_head": lambda z, hook: torch.zeros_like(z), "images": [ex.image for ex in examples],
        "prompts": ["What colour is the shape?"] * 2,
    }


def test_every_readme_snippet_runs_on_the_toys():
    blocks = snippets()
    assert len(blocks) >= 3
    namespace = {"HookedVLM": tl_vlm.HookedVLM, "torch": torch, "tl_vlm": tl_vlm, **_reader_names()}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)


def test_the_documented_verify_call():
    names = _reader_names()
    report = tl_vlm.verify("tl-vlm/toy-llava", images=names["images"], prompts=names["prompts"])
    assert report.passed, report.failures
