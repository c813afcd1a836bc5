"""An image-and-text processor for InternVL checkpoints when HF's cannot load (``InternVLProcessor`` needs its
video processor, which needs torchvision). It does what ``InternVLProcessor`` does for images: HF's image processor
(``GotOcr2ImageProcessorPil``, ``crop_to_patches=True``) cuts each image into tiles (+ thumbnail), and each
``<IMG_CONTEXT>`` in the text becomes ``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``.
Videos are not supported (HF's path for them needs torchvision).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import BatchFeature


class InternVLImageTextProcessor:
    def __init__(self, tokenizer, image_processor, image_seq_length: int = 256, chat_template: str | None = None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_seq_length = image_seq_length
        self.image_token = tokenizer.context_image_token
        self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
        self.image_token_id = tokenizer.context_image_token_id
        self.chat_template = chat_template or tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path) -> InternVLImageTextProcessor:
        """From a checkpoint's tokenizer, image processor and ``processor_config.json`` (its ``image_seq_length``)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        config = json.loads((path / "processor_config.json").read_text())
        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   config.get("image_seq_length", 256))

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, **kwargs)

    def __call__(self, images=None, text=None, videos=None, return_tensors="pt", **text_kwargs) -> BatchFeature:
        if videos is not None:
            raise NotImplementedError("videos need HF's InternVLProcessor (torchvision); tl_vlm's fallback takes images")
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict = {}
        tiles: list[int] = []
        if images is not None:
            processed = self.image_processor(images=images, crop_to_patches=True, return_tensors=return_tensors)
            tiles = list(processed.pop("num_patches").tolist())
            batch.update(processed)

        def expand(match: re.Match) -> str:
            if not tiles:
                raise ValueError(f"more {self.image_token} placeholders in the text than images")
            n = tiles.pop(0)
            return f"{self.start_image_token}{self.image_token * (self.image_seq_length * n)}{self.end_image_token}"

        expanded = [re.sub(re.escape(self.image_token), expand, t) for t in texts]
        if tiles:
            raise ValueError(f"{len(tiles)} images without a {self.image_token} placeholder in the text")
        text_kwargs.setdefault("padding_side", "left")  # as InternVLProcessor
        batch.update(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
        return BatchFeature(batch)
