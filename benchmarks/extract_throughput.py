"""Extraction throughput (images/s): ``tl_vlm.store.extract`` at batch 1 and 8 vs a VLM-Lens-style loop
(HF model, ``register_forward_hook`` on every decoder layer, batch 1, one INSERT + commit per row).

Usage: python benchmarks/extract_throughput.py [--shape design] [--images 32]
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
from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

from common import llava_model, write_report
from tl_vlm.store import ExtractConfig, extract
from tl_vlm.store.extract import format_prompt
from tl_vlm.zoo.tiny import build_tokenizer, sample_images

PROMPT = "Describe the image."


def save_checkpoint(shape: str, path: Path) -> None:
    """A random-init LLaVA at ``shape`` with a processor, so both loops start from files."""
    model = llava_model(shape)
    tok = build_tokenizer()
    size = model.config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok, patch_size=model.config.vision_config.patch_size, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    model.config.image_token_index = tok.convert_tokens_to_ids("<image>")
    model.save_pretrained(path)
    processor.save_pretrained(path)


def vlm_lens_style(path: Path, images: list[Path], db: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tensors (id INTEGER PRIMARY KEY, layer TEXT, image_path TEXT, tensor BLOB)")
    outputs = {}
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    text = format_prompt(processor, PROMPT)
    for image_path in images:
        from PIL import Image

        inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt")
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
    parser.add_argument("--shape", default="design")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(args.shape, tmp / "model")
        (tmp / "images").mkdir()
        paths = []
        for i, image in enumerate(sample_images(args.images, seed=1)):
            paths.append(tmp / "images" / f"{i:04d}.png")
            image.save(paths[-1])
        rows = []
        start = time.perf_counter()
        vlm_lens_style(tmp / "model", paths, tmp / "vlm_lens.db")
        base = args.images / (time.perf_counter() - start)
        rows.append({"loop": "VLM-Lens-style (HF hooks, batch 1, commit per row)", "images_per_s": base, "speedup": 1.0})
        for batch in (1, 8):
            cfg = ExtractConfig(model_path=str(tmp / "model"), output_db=str(tmp / f"tl_{batch}.db"),
                                modules=[r"blocks\.\d+\.hook_resid_post"], input_dir=str(tmp / "images"),
                                prompt=PROMPT, batch_size=batch, device="cpu")
            start = time.perf_counter()
            extract(cfg, progress=False)
            rate = args.images / (time.perf_counter() - start)
            rows.append({"loop": f"tl_vlm extract, batch {batch}", "images_per_s": rate, "speedup": rate / base})
    write_report(f"extract_{args.shape}", rows, {"shape": args.shape, "images": args.images, "threads": args.threads},
                 Path(__file__).parent / "results")


if __name__ == "__main__":
    main()
