"""VLMInputs: token ids with their images attached, usable wherever TransformerLens passes "tokens".

TL's tools treat tokens as a ``[batch, pos]`` tensor: they read ``shape`` / ``ndim`` / ``len``, take rows
(``tokens[i]``, ``tokens[a:b]``, ``tokens[mask]``), move them (``.to``) and join them (``torch.cat``). A
``VLMInputs`` does all of that with each row's images kept with the row, so every run a tool makes carries its
images. Indexing positions (``tokens[:, -1]``) gives plain token ids, as TL expects; running those without the
images raises wherever they hold image placeholders.

Which images belong to which row comes from the prompt text (``model.prepare`` counts each row's image and video
placeholders: ``row_images`` / ``row_videos``); without it, only a one-row batch can be split or joined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Fields with one entry per row, per image, per video; and the row layout, which is no model input.
_PER_ROW = {"input_ids", "attention_mask", "batch_num_images", "mm_token_type_ids", "token_type_ids",
            "qformer_input_ids", "qformer_attention_mask", "decoder_input_ids", "decoder_attention_mask",
            "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"}
_PER_IMAGE = {"pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "spatial_shapes"}
_LAYOUT = {"row_images", "row_videos"}


@dataclass
class VLMInputs:
    """What HF processors return for the supported families; each family consumes its own subset."""

    input_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "..."] | None = None
    attention_mask: Int[Tensor, "batch pos"] | None = None
    image_sizes: Int[Tensor, "image 2"] | None = None  # LLaVA-NeXT: (height, width) per image
    batch_num_images: Int[Tensor, " prompt"] | None = None  # LLaVA-OneVision: images per prompt (>1: no tiles)
    image_grid_thw: Int[Tensor, "image 3"] | None = None  # Qwen-VL: patch grid per image
    pixel_values_videos: Float[Tensor, "..."] | None = None
    video_grid_thw: Int[Tensor, "video 3"] | None = None
    second_per_grid_ts: Float[Tensor, " video"] | None = None  # Qwen2.5-VL: seconds per temporal patch
    mm_token_type_ids: Int[Tensor, "batch pos"] | None = None
    # Gemma 3: 1 at image tokens; PaliGemma: 1 on the suffix. Tokenizers return them for other models too, which
    # carry nothing there: HookedVLM drops them for families that do not read them.
    token_type_ids: Int[Tensor, "batch pos"] | None = None
    qformer_input_ids: Int[Tensor, "batch qpos"] | None = None  # InstructBLIP: instruction for the Q-Former
    qformer_attention_mask: Int[Tensor, "batch qpos"] | None = None
    decoder_input_ids: Int[Tensor, "batch dec_pos"] | None = None  # encoder-decoder LMs (Flan-T5)
    decoder_attention_mask: Int[Tensor, "batch dec_pos"] | None = None
    # Mllama: one pixel_values entry per row [batch, image, tile, ...]; aspect-ratio id and real tiles per image,
    # and which image tiles each token may see.
    aspect_ratio_ids: Int[Tensor, "batch image"] | None = None
    aspect_ratio_mask: Int[Tensor, "batch image tile"] | None = None
    cross_attention_mask: Int[Tensor, "batch pos image tile"] | None = None
    pixel_attention_mask: Int[Tensor, "..."] | None = None  # Idefics3 / SmolVLM: real (1) and padding (0) pixels
    spatial_shapes: Int[Tensor, "image 2"] | None = None  # SigLIP 2 (NaFlex): each image's (h, w) patch grid
    # Images / videos of each row, in order (set by model.prepare); not model inputs.
    row_images: tuple[int, ...] | None = None
    row_videos: tuple[int, ...] | None = None

    @property
    def shape(self) -> torch.Size:
        """The token shape, so TL code that reads ``tokens.shape`` works unchanged."""
        return self.input_ids.shape

    @property
    def ndim(self) -> int:
        return self.input_ids.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.input_ids.dtype

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def size(self, dim: int | None = None):
        return self.input_ids.size() if dim is None else self.input_ids.size(dim)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to(self, device) -> "VLMInputs":
        return replace(self, **{k: v.to(device) for k, v in self.as_kwargs().items()})

    def as_kwargs(self) -> dict[str, Tensor]:
        """The model inputs (every non-empty tensor field)."""
        return {f.name: v for f in fields(self) if f.name not in _LAYOUT and (v := getattr(self, f.name)) is not None}

    # ---------------------------------------------------------------- rows

    def __getitem__(self, index) -> "VLMInputs | Tensor":
        if isinstance(index, tuple):
            if len(index) == 1:
                return self[index[0]]
            if index[0] == slice(None) and all(i == slice(None) for i in index[1:]):
                return self
            return self.input_ids[index]  # positions: plain token ids (running them without images raises)
        if self.ndim == 1:
            return self.input_ids[index]
        rows = torch.arange(len(self))[index]
        picked = self.rows(rows.reshape(-1).tolist())
        return picked.squeezed() if rows.ndim == 0 else picked

    def rows(self, rows: list[int]) -> "VLMInputs":
        """These rows, each with its own images and videos."""
        images, videos = self._row_counts()
        image_items, video_items = _items(images, rows), _items(videos, rows)
        changes: dict[str, Any] = {"row_images": tuple(images[r] for r in rows), "row_videos": tuple(videos[r] for r in rows)}
        for name, value in self.as_kwargs().items():
            if name in _PER_ROW:
                changes[name] = value[rows]
            elif name in _PER_IMAGE:
                changes[name] = _take(value, image_items, self.image_grid_thw if name == "pixel_values" else None)
            else:
                changes[name] = _take(value, video_items, self.video_grid_thw if name == "pixel_values_videos" else None)
        return replace(self, **changes)

    def squeezed(self) -> "VLMInputs":
        """A one-row batch as one unbatched row (``tokens[0]``'s shape is ``[pos]``)."""
        return replace(self, **{name: self.as_kwargs()[name][0] for name in _PER_ROW if getattr(self, name) is not None})

    def _row_counts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n_images = 0 if self.pixel_values is None else _count(self.pixel_values, self.image_grid_thw)
        n_videos = 0 if self.pixel_values_videos is None else _count(self.pixel_values_videos, self.video_grid_thw)
        if self.ndim == 1 or len(self) == 1:
            return (n_images,), (n_videos,)
        if (n_images and self.row_images is None) or (n_videos and self.row_videos is None):
            raise ValueError(
                "these inputs do not say which images belong to which row, so their rows cannot be split or joined "
                "without dropping or mixing images; build them with model.prepare(images=, text=) or pass "
                "row_images= (images per row, in order)"
            )
        return self.row_images or (0,) * len(self), self.row_videos or (0,) * len(self)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            return cls.cat(*args, **(kwargs or {}))
        raise TypeError(
            f"torch.{getattr(func, '__name__', func)} does not take VLMInputs (only torch.cat does, on rows); "
            "use .input_ids for the token ids"
        )

    @classmethod
    def cat(cls, parts, dim: int = 0) -> "VLMInputs":
        """Rows of several inputs, in order, each keeping its images (``torch.cat([a, b])``)."""
        if dim != 0:
            raise ValueError("VLMInputs concatenate along rows (dim=0) only; positions would separate text from images")
        parts = [p.unsqueezed() for p in parts]
        lengths = {p.shape[1] for p in parts}
        if len(lengths) > 1:
            raise ValueError(f"cannot concatenate rows of different lengths {sorted(lengths)}; pad them with model.prepare")
        names = [set(p.as_kwargs()) for p in parts]
        if any(n != names[0] for n in names):
            raise ValueError(f"cannot concatenate inputs with different fields: {[sorted(n) for n in names]}")
        counts = [p._row_counts() for p in parts]
        joined = {name: torch.cat([p.as_kwargs()[name] for p in parts]) for name in names[0]}
        return cls(**joined, row_images=sum((c[0] for c in counts), ()), row_videos=sum((c[1] for c in counts), ()))

    def unsqueezed(self) -> "VLMInputs":
        """An unbatched row as a one-row batch."""
        if self.ndim == 2:
            return self
        return replace(self, **{name: self.as_kwargs()[name][None] for name in _PER_ROW if getattr(self, name) is not None})

    @classmethod
    def from_mapping(cls, batch: Mapping[str, Any]) -> "VLMInputs":
        known = {f.name for f in fields(cls)}
        unknown = set(batch) - known
        if unknown:
            raise ValueError(
                f"inputs {sorted(unknown)} are not used by this model; refusing to drop them silently "
                f"(accepted: {sorted(known)})"
            )
        return cls(**{k: v for k, v in batch.items() if k in known})


def _count(pixels: Tensor, grid: Tensor | None) -> int:
    """Images (or videos) in a pixel tensor: its first dimension, or the grids' count where patches are packed."""
    return len(grid) if grid is not None else len(pixels)


def _items(per_row: tuple[int, ...], rows: list[int]) -> list[int]:
    starts = [sum(per_row[:r]) for r in range(len(per_row))]
    return [starts[r] + k for r in rows for k in range(per_row[r])]


def _take(value: Tensor, items: list[int], grid: Tensor | None) -> Tensor:
    """Entries of a per-image (per-video) field; Qwen-VL packs each image's patches, ``prod(grid)`` rows each."""
    if grid is None:
        return value[items]
    sizes = grid.prod(-1).tolist()
    chunks = value.split(sizes)
    return torch.cat([chunks[i] for i in items]) if items else value[:0]
