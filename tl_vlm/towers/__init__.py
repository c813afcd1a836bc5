"""Towers: stacks of hooked blocks with their embeddings, one per part of a VLM."""

from tl_vlm.towers.language import DecoderLM
from tl_vlm.towers.projector import MLPProjector
from tl_vlm.towers.vision import CLIPVisionTower

__all__ = ["CLIPVisionTower", "DecoderLM", "MLPProjector"]
