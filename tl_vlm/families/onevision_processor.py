"""An image-and-text processor for LLaVA-OneVision checkpoints when HF's cannot load (its video processor needs
torchvision). It does what ``LlavaOnevisionProcessor`` does: run the (PIL) image processor, then expand each
``<image>`` to the image's feature count (base tile + unpadded, anyres_max-downsampled grid with a newline per
row; grid + 1 newline in a multi-image prompt) and each ``<video>`` to frames x ceil(grid/2)^2 + 1.

Videos (``videos=``: per video a list of PIL frames, all videos the same length) are resized to the image size
with PIL's bicubic filter, rescaled and normalised with the image processor's statistics, as HF's
``LlavaOnevisionVideoProcessor`` does with torchvision (whose resampling differs in the last bits).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from tl_vlm.families.onevision_layout import image_token_count, max_tiles, video_token_count


class OnevisionImageTextProcessor:
    def __init__(
        self,
        tokenizer,
        image_processor,
        num_image_tokens: int,
        vision_aspect_ratio: str = "anyres_max_9",
        vision_feature_select_strategy: str = "full",
        image_token: str = "<image>",
        video_token: str = "<video>",
        chat_template: str | None = None,
    ):
        if vision_feature_select_strategy != "full":
            raise NotImplementedError("LLaVA-OneVision with the 'default' feature strategy")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.vision_aspect_ratio = num_image_tokens, vision_aspect_ratio
        self.image_token, self.video_token = image_token, video_token
        self.chat_template = chat_template or tokenizer.chat_template
        self._placeholder = re.compile(f"({re.escape(image_token)}|{re.escape(video_token)})")

    @classmethod
    def from_pretrained(cls, path) -> OnevisionImageTextProcessor:
        """From a checkpoint's tokenizer, image processor and ``processor_config.json`` (flat, as on the hub, or
        transformers 5's nested form)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        config = json.loads((path / "processor_config.json").read_text())
        keys = ("num_image_tokens", "vision_aspect_ratio", "vision_feature_select_strategy", "image_token", "video_token")
        return cls(
            AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path),
            **{k: config[k] for k in keys if k in config},
        )

    def apply_chat_template(self, messages, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, **kwargs)

    def image_token_counts(self, image_sizes: list[tuple[int, int]], batch_num_images: list[int]) -> list[int]:
        """Placeholder tokens per image ((height, width) each); tiled only when alone in its prompt."""
        ip = self.image_processor
        grid = math.isqrt(self.num_image_tokens)
        alone = [n == 1 for n in batch_num_images for _ in range(n)]
        return [
            image_token_count(tuple(size), a, ip.image_grid_pinpoints, ip.size["height"], grid,
                              max_tiles(self.vision_aspect_ratio))
            for size, a in zip(image_sizes, alone)
        ]

    def videos_to_pixels(self, videos) -> torch.Tensor:
        """[video, frame, channel, height, width]: each frame resized (bicubic), rescaled and normalised."""
        ip = self.image_processor
        size = (ip.size["width"], ip.size["height"])
        mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
        if len({len(v) for v in videos}) != 1:
            raise ValueError("all videos of one call must have the same number of frames")

        def frame(img) -> np.ndarray:
            img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            array = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
            return ((array - mean) / std).transpose(2, 0, 1)

        return torch.from_numpy(np.stack([np.stack([frame(f) for f in video]) for video in videos]))

    def __call__(self, images=None, text=None, videos=None, return_tensors="pt", **text_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        batch: dict = {}
        counts = {self.image_token: [], self.video_token: []}
        if images is not None:
            batch.update(self.image_processor(images=images, return_tensors="pt"))
            counts[self.image_token] = self.image_token_counts(
                batch["image_sizes"].tolist(), batch["batch_num_images"].tolist()
            )
        if videos is not None:
            batch["pixel_values_videos"] = self.videos_to_pixels(videos)
            grid = math.isqrt(self.num_image_tokens)
            counts[self.video_token] = [video_token_count(len(v), grid) for v in videos]

        def expand(match: re.Match) -> str:
            token = match.group(0)
            if not counts[token]:
                raise ValueError(f"more {token} placeholders in the text than inputs for them")
            return token * counts[token].pop(0)

        expanded = [self._placeholder.sub(expand, t) for t in texts]
        left = {token: len(c) for token, c in counts.items() if c}
        if left:
            raise ValueError(f"inputs without a placeholder in the text: {left}")
        batch.update(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
        return BatchFeature(batch)
