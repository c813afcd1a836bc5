"""An image-and-text processor for Qwen-VL checkpoints when HF's cannot load (its video processor needs
torchvision). It does what ``Qwen2VLProcessor`` does for images: run the image processor, then expand
each image placeholder into ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``,
and mark image tokens in ``mm_token_type_ids``. Videos need HF's processor (install torchvision).
"""

from __future__ import annotations

import re

import torch
from transformers import BatchFeature

IMAGE, START, END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
_PLACEHOLDER = re.compile(re.escape(START) + "?" + re.escape(IMAGE) + "(?:" + re.escape(END) + ")?")


class QwenImageTextProcessor:
    image_token = IMAGE

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path) -> "QwenImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images=None, text=None, return_tensors="pt", **text_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        batch = {}
        counts: list[int] = []
        if images is not None:
            batch.update(self.image_processor(images=images, return_tensors="pt"))
            counts = (batch["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        expanded = []
        for t in texts:
            def expand(match: re.Match) -> str:
                if not counts:
                    raise ValueError("more image placeholders in the text than images")
                return START + IMAGE * counts.pop(0) + END

            expanded.append(_PLACEHOLDER.sub(expand, t))
        if counts:
            raise ValueError(f"{len(counts)} images have no placeholder in the text")
        tokens = self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE)
        batch.update(tokens, mm_token_type_ids=(tokens["input_ids"] == image_id).to(torch.int))
        return BatchFeature(batch)
