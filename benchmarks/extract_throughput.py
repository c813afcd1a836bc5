"""Extraction throughput (images/s): ``tl_vlm.store.extract`` at batch 1 and 8 vs a VLM-Lens-style loop
(HF model, ``register_forward_hook`` on every decoder layer, batch 1, one INSERT + commit per row).

Usage: python benchmarks/extract_throughput.py [--family llava|blip2|qwen2_vl] [--shape design] [--images 32]
Both store every language layer's output, unpooled, for the same images and prompt.
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from common import FAMILIES, PROMPT, SHAPES, block_modules, save_checkpoint, write_report
from tl_vlm.families import family_for
from tl_vlm.store import ExtractConfig, extract
from tl_vlm.prompts import format_prompt
from tl_vlm.zoo.data import sample_images


def vlm_lens_style(path: Path, images: list[Path], db: Path, device: str) -> None:
    model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
    processor = family_for(model.config).load_processor(path, False)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tensors (id INTEGER PRIMARY KEY, layer TEXT, image_path TEXT, tensor BLOB)")
    outputs = {}
    layers = [m for name, m in block_modules(model) if "language_model" in name]
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    text = format_prompt(processor, PROMPT)
    for image_path in images:
        inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            model(**inputs)
        for i, tensor in outputs.items():
            buffer = io.BytesIO()
            torch.save(tensor.detach().cpu(), buffer)
            conn.execute("INSERT INTO tensors (layer, image_path, tensor) VALUES (?,?,?)", (str(i), str(image_path), buffer.getvalue()))
            conn.commit()
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--shape", default="design", choices=SHAPES)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(args.family, args.shape, tmp / "model")
        (tmp / "images").mkdir()
        paths = []
        for i, image in enumerate(sample_images(args.images, seed=1)):
            paths.append(tmp / "images" / f"{i:04d}.png")
            image.save(paths[-1])
        rows = []
        start = time.perf_counter()
        vlm_lens_style(tmp / "model", paths, tmp / "vlm_lens.db", args.device)
        base = args.images / (time.perf_counter() - start)
        rows.append({"loop": "VLM-Lens-style (HF hooks, batch 1, commit per row)", "images_per_s": base, "speedup": 1.0})
        for batch in (1, 8):
            cfg = ExtractConfig(model_path=str(tmp / "model"), output_db=str(tmp / f"tl_{batch}.db"),
                                modules=[r"blocks\.\d+\.hook_resid_post"], input_dir=str(tmp / "images"),
                                prompt=PROMPT, batch_size=batch, device=args.device)
            start = time.perf_counter()
            extract(cfg, progress=False)
            rate = args.images / (time.perf_counter() - start)
            rows.append({"loop": f"tl_vlm extract, batch {batch}", "images_per_s": rate, "speedup": rate / base})
    meta = {"family": args.family, "shape": args.shape, "images": args.images, "threads": args.threads, "device": args.device}
    write_report(f"extract_{args.family}_{args.shape}", rows, meta)


if __name__ == "__main__":
    main()
