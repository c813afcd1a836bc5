"""Towers: stacks of hooked blocks with their embeddings, one per part of a VLM."""

from tl_vlm.towers.language import DecoderLM
from tl_vlm.towers.projector import LinearProjector, MLPProjector
from tl_vlm.towers.qformer import QFormer
from tl_vlm.towers.vision import ViTTower

__all__ = ["DecoderLM", "LinearProjector", "MLPProjector", "QFormer", "ViTTower"]
