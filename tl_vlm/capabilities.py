"""What a model declares about its image tokens, so analysis code asks instead of guessing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """Declared by each family from its config (``model.capabilities``)."""

    # Image features sit at placeholder positions of ``input_ids`` (False: BLIP-2's legacy form prepends them).
    image_positions: bool = True
    # Each image token maps to vision-tower patches with a pixel box (the spatial index); False for queries.
    spatial_cells: bool = True
    # Vision-tower patches behind one language image token (Qwen-VL's 2x2 merger: 4); 0 when tokens are queries.
    patches_per_token: int = 1
    # Image tokens are learned Q-Former queries (``model.qformer``) that read the patches by cross-attention.
    queries: bool = False
    # Images are cut into tiles, each its own vision-tower row (LLaVA-NeXT anyres).
    tiles: bool = False
    # Takes videos (frames through the vision tower, placeholders of their own).
    video: bool = False
    # Vision-tower rows are padded to the longest image (Qwen-VL, Pixtral); ``model.padded_rows(inputs, hook)``.
    padded_vision_rows: bool = False
    # The language model is an encoder-decoder (``encoder.*`` / ``decoder.*`` towers, no top-level ``blocks``).
    encoder_decoder: bool = False
    # Images reach the language model only through cross-attention layers (Mllama's ``blocks.{i}.cross_attn``): no
    # language position holds image features (``image_positions`` False), and those blocks have no self-attention.
    cross_attention: bool = False
