"""An image-and-text processor for Pixtral / Mistral3 checkpoints when HF's cannot load (``PixtralProcessor``
requires torchvision). It does what ``PixtralProcessor`` does: run the (PIL) image processor with patches of
``patch_size * spatial_merge_size`` pixels (images keep their aspect ratio and are resized to whole tokens), then
expand each ``[IMG]`` in the text into the image's token rows: ``[IMG]`` per token, ``[IMG_BREAK]`` after each row,
``[IMG_END]`` instead of the last ``[IMG_BREAK]``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import BatchFeature


class PixtralImageTextProcessor:
    def __init__(
        self,
        tokenizer,
        image_processor,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        chat_template: str | None = None,
    ):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.chat_template = chat_template or tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path) -> PixtralImageTextProcessor:
        """From a checkpoint's tokenizer, image processor and ``processor_config.json`` (as on the hub)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        config = json.loads((path / "processor_config.json").read_text())
        keys = ("patch_size", "spatial_merge_size", "image_token", "image_break_token", "image_end_token")
        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   **{k: config[k] for k in keys if k in config})

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, **kwargs)

    def expansion(self, height: int, width: int) -> str:
        """The placeholder text of one image of this (resized) size."""
        side = self.patch_size * self.spatial_merge_size
        rows = [self.image_token * (width // side) + self.image_break_token] * (height // side)
        return "".join(rows)[: -len(self.image_break_token)] + self.image_end_token

    def __call__(self, images=None, text=None, return_tensors="pt", **text_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict = {}
        sizes: list[list[int]] = []
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            flat = [image for group in images for image in (group if isinstance(group, (list, tuple)) else [group])]
            batch.update(self.image_processor(
                images=flat, patch_size=self.patch_size * self.spatial_merge_size, return_tensors="pt"
            ))
            sizes = batch["image_sizes"].tolist()
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            if len(parts) - 1 > len(sizes):
                raise ValueError(f"more {self.image_token} placeholders in the text than images")
            expanded.append(parts[0] + "".join(self.expansion(*sizes.pop(0)) + rest for rest in parts[1:]))
        if sizes:
            raise ValueError(f"{len(sizes)} images have no {self.image_token} placeholder in the text")
        batch.update(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
        return BatchFeature(batch)
