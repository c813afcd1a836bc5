"""DeepStack (Qwen3-VL): features of intermediate vision blocks, each through its own merger, added to the output
of the first language blocks at the visual positions.

- ``projector.deepstack.{k}``: the merger of vision block ``deepstack_visual_indexes[k]`` (HF:
  ``visual.deepstack_merger_list.{k}``). Unlike the main merger it normalises the concatenated 2x2 block
  (``ln`` over ``merge**2 * d_vision``); hooks ``hook_in`` [image, patch, d_vision], ``ln.*``, ``mlp.*``,
  ``hook_out`` [image, token, d_model].
- ``blocks.{k}.hook_deepstack`` [batch, pos, d_model]: what is added to the output of language block ``k``
  (zero at text positions). The stream entering block ``k + 1`` is ``blocks.{k}.hook_resid_post +
  blocks.{k}.hook_deepstack``: ``hook_resid_post`` stays HF's layer output (HF's ``hidden_states[k + 1]``), and
  ``hook_resid_pre`` of the next block is what that block reads. So the DeepStack term is one more residual
  component; ``activation_cache.VLMActivationCache`` counts it in ``decompose_resid`` and
  ``get_full_resid_decomposition`` (label ``{k}_deepstack``) so they sum exactly to the residual stream.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import KVCache, Rotary, make_norm
from tl_vlm.components.hooks import active, run_hook
from tl_vlm.components.moe import MoE, MoEConfig
from tl_vlm.config import TowerConfig
from tl_vlm.towers.language import DecoderLM
from tl_vlm.towers.patch_merger import PatchMerger


class DeepStackMerger(PatchMerger):
    """HF's ``Qwen3VLVisionPatchMerger(use_postshuffle_norm=True)``: concatenate each merge block, then norm."""

    def __init__(self, d_vision: int, d_out: int, merge_size: int, normalization_type: str, eps: float = 1e-6):
        super().__init__(d_vision, d_out, merge_size, normalization_type, eps)
        self.ln = make_norm(normalization_type, self.d_merged, eps)

    def forward(self, x: Float[Tensor, "image patch d_vision"]) -> Float[Tensor, "image token d_out"]:
        x = run_hook(self.hook_in, x)
        x = self.ln(x.reshape(x.shape[0], -1, self.d_merged))
        return run_hook(self.hook_out, self.mlp(x))


class DeepStackProjector(PatchMerger):
    """The main merger (``projector.*``, as Qwen2-VL's) plus one ``DeepStackMerger`` per DeepStack vision block."""

    def __init__(self, d_vision: int, d_out: int, merge_size: int, normalization_type: str, n_deepstack: int):
        super().__init__(d_vision, d_out, merge_size, normalization_type)
        self.deepstack = nn.ModuleList(
            [DeepStackMerger(d_vision, d_out, merge_size, normalization_type) for _ in range(n_deepstack)]
        )


class DeepStackLM(DecoderLM):
    """A decoder LM whose first ``cfg.deepstack_layers`` blocks get visual features added to their outputs; with
    ``moe``, the MLPs of its sparse blocks are mixtures of experts (``components/moe.py``)."""

    resumable = False  # visual features are added between blocks

    def __init__(self, cfg: TowerConfig, rotary: Rotary, moe: MoEConfig | None = None):
        super().__init__(cfg, rotary)
        for i in moe.sparse_layers if moe is not None else ():  # Qwen3-VL-MoE: these blocks' MLPs are experts
            self.blocks[i].mlp = MoE(cfg.d_model, cfg.act_fn, moe)
        n_deepstack = cfg.deepstack_layers
        for block in self.blocks[:n_deepstack]:
            block.hook_deepstack = HookPoint()  # [batch, pos, d_model]; added to the block's output
        self.n_deepstack = n_deepstack

    def forward(
        self,
        embeds: Float[Tensor, "batch pos d_model"],
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        stop_at_layer: int | None = None,
        logits_to_keep: int = 0,
        visual_mask: Bool[Tensor, "batch pos"] | None = None,
        deepstack: list[Float[Tensor, "n_visual d_model"]] | None = None,
    ) -> Tensor:
        """As ``DecoderLM.forward``; ``deepstack[k]`` (one row per ``visual_mask`` position) is added to block
        ``k``'s output. Without it (text, decode steps) nothing is added, but hooked ``hook_deepstack`` still see
        (and may edit) the zero term, so decompositions of text runs hold too."""
        batch, pos = embeds.shape[:2]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + pos, device=embeds.device).expand(batch, -1)
        rotary = self.rotary(position_ids, embeds.dtype)
        mask, causal = self._mask(attention_mask, batch, pos, past, embeds)
        resid = embeds
        for i, block in enumerate(self.blocks[:stop_at_layer]):
            resid = block(resid, rotary, mask, causal, cache[i] if cache is not None else None)
            if i < self.n_deepstack and (deepstack is not None or active(block.hook_deepstack)):
                added = torch.zeros_like(resid)
                if deepstack is not None:
                    added = added.masked_scatter(visual_mask[..., None].to(resid.device), deepstack[i].to(resid))
                resid = resid + run_hook(block.hook_deepstack, added)
        if stop_at_layer is not None:
            return resid
        return self.unembed(self.ln_final(resid)[:, -logits_to_keep:])
