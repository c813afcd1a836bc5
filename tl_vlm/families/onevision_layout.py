"""LLaVA-OneVision's token layout, shared by its family and its processor: how many vision-tower rows (tiles) and
placeholder tokens each image and video takes, with anyres_max downsampling of large tile grids."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution


@dataclass(frozen=True)
class AnyresLayout:
    """Where one tiled image's packed grid sits in its tile canvas, in patch units."""

    tiles_h: int  # tile grid of the best-fit canvas
    tiles_w: int
    top: int  # the unpadded grid's offset in the canvas patch grid
    left: int
    height: int  # unpadded grid, in patches
    width: int
    out_h: int  # after anyres_max downsampling (height, width when none)
    out_w: int

    @property
    def downsampled(self) -> bool:
        return (self.out_h, self.out_w) != (self.height, self.width)

    @property
    def n_tokens(self) -> int:
        """Tokens after the base tile: the packed grid with one newline per row."""
        return self.out_h * (self.out_w + 1)


def max_tiles(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9."""
    prefix = "anyres_max_"
    if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
        raise NotImplementedError(f"vision_aspect_ratio {vision_aspect_ratio!r}: only 'anyres_max_N' is supported")
    return int(vision_aspect_ratio[len(prefix):])


def anyres_layout(
    image_size: tuple[int, int], pinpoints: list, tile: int, grid: int, max_n: int
) -> AnyresLayout:
    """The packed grid of an image of ``image_size`` (height, width) as HF's ``pack_image_features`` builds it:
    best-fit canvas of ``tile``-pixel tiles with ``grid`` patches a side, unpadding, anyres_max downsampling."""
    h, w = image_size
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    tiles_h, tiles_w = best_h // tile, best_w // tile
    canvas_h, canvas_w = tiles_h * grid, tiles_w * grid
    top = left = 0
    height, width = canvas_h, canvas_w
    if w / h > canvas_w / canvas_h:  # wider than the canvas: padding above and below
        top = (canvas_h - int(round(h * (canvas_w / w), 7))) // 2
        height = canvas_h - 2 * top
    else:
        left = (canvas_w - int(round(w * (canvas_h / h), 7))) // 2
        width = canvas_w - 2 * left
    ratio = math.sqrt(height * width / (max_n * grid**2))
    out_h, out_w = (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)
    return AnyresLayout(tiles_h, tiles_w, top, left, height, width, out_h, out_w)


def tiles_per_image(
    image_sizes: Int[Tensor, "image 2"], batch_num_images: Int[Tensor, " prompt"] | None, pinpoints: list, tile: int
) -> list[int]:
    """Vision-tower rows per image: the base tile plus its anyres tiles, or 1 in a multi-image prompt."""
    tiled = [True] * len(image_sizes) if batch_num_images is None else [
        n == 1 for n in batch_num_images.tolist() for _ in range(n)
    ]
    if len(tiled) != len(image_sizes):
        raise ValueError(
            f"batch_num_images {batch_num_images.tolist()} counts {len(tiled)} images but image_sizes gives "
            f"{len(image_sizes)}; pass both from the same processor call"
        )
    counts = []
    for (h, w), tiles in zip(image_sizes.tolist(), tiled):
        best_h, best_w = select_best_resolution((h, w), pinpoints)
        counts.append(1 + (best_h // tile) * (best_w // tile) if tiles else 1)
    return counts


def image_token_count(image_size: tuple[int, int], alone: bool, pinpoints: list, tile: int, grid: int, max_n: int) -> int:
    """Placeholder tokens of one image (what the processor expands ``<image>`` to); ``alone``: only image of
    its prompt (tiled)."""
    if not alone:
        return grid * grid + 1
    return grid * grid + anyres_layout(image_size, pinpoints, tile, grid, max_n).n_tokens


def video_token_count(n_frames: int, grid: int) -> int:
    return n_frames * math.ceil(grid / 2) ** 2 + 1
