"""The first-position shortcut: a patch at (layer L, position p) of a causal language tower cannot change
anything at positions before p, nor anything below layer L.

So a batch of cells whose first patched position is ``p`` and first patched layer ``L`` starts from the corrupted
run's ``blocks.{L}.hook_resid_pre`` at positions ``p:``, attends to the corrupted run's keys and values of
positions ``:p`` (a KV cache filled once, from one corrupted forward), reuses the corrupted logits of positions
``:p`` and unembeds only the positions the metric reads (lazy_logits.py). Mathematically this is the full patched
run; numerically it differs from it by float rounding of matmuls of other shapes (tests compare it with TL's loop).

It applies only where that reasoning holds, and the sweep runs full forwards otherwise: the language tower of a
decoder-only HookedVLM (or its tower view) whose tower declares itself ``resumable`` (``DecoderLM``: nothing
happens between its blocks) and whose blocks are ``TransformerBlock``, an activation inside block L (``blocks.{L}.*``),
language positions equal to the token positions (not BLIP-2's legacy prepended queries), and no PyTorch hook or
swapped module anywhere in the model (it would see only the suffix; placement over devices and block offloading
are such hooks, so they run full forwards). Cells start at their position only with
the setters that patch one position (TL's ``layer_pos_patch_setter`` and ``layer_pos_head_vector_patch_setter``:
resid, attn/mlp out, q/k/v/z by position); others (patterns, all positions) start at position 0 of layer L, which
still skips the vision tower and the layers below.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformer_lens.patching import layer_pos_head_vector_patch_setter, layer_pos_patch_setter
from transformer_lens.utilities import get_act_name

from tl_vlm.components.block import TransformerBlock
from tl_vlm.components.hooks import observed
from tl_vlm.components.kv_cache import KVCache, KVCacheEntry
from tl_vlm.patching.lazy_logits import LazyLogits
from tl_vlm.tower_view import TowerView

# Setters that patch one position (index [layer, pos, ...], activations [batch, pos, ...]); any other setter
# patches from layer L on at every position (first = 0).
_PER_POSITION = (layer_pos_patch_setter, layer_pos_head_vector_patch_setter)


class PrefixRun:
    """The corrupted run's state the shortcut reuses: per-layer resid_pre, keys/values, logits, and the
    rotary tables and mask the tower gave its blocks."""

    def __init__(self, vlm, resid_pre: list[Tensor], kv: KVCache, logits: Tensor, block_args: tuple, per_position: bool):
        self.vlm, self.resid_pre, self.kv, self.logits = vlm, resid_pre, kv, logits
        self.per_position = per_position  # cells may start at their position (else at position 0)
        self.rotary, self.mask, self.causal = block_args

    @classmethod
    def build(cls, model, tokens, setter, activation_name: str) -> "PrefixRun | None":
        """The corrupted run's state, or None where the shortcut does not apply."""
        from tl_vlm.hooked_vlm import HookedVLM
        from tl_vlm.towers.language import DecoderLM

        if isinstance(model, TowerView):
            model = model.model if model.name == "language" else None
        # The activation must live inside block ``layer`` (computed from its resid_pre): blocks.{layer}.*
        if not isinstance(model, HookedVLM) or not get_act_name(activation_name, layer=0).startswith("blocks.0."):
            return None
        tower = model.language
        swapped = any(type(b) is not TransformerBlock for b in tower.blocks)  # a user's module in a block's place
        if not isinstance(tower, DecoderLM) or not tower.resumable or swapped or observed(model):
            return None
        captured: list[tuple] = []

        def grab(block, args):
            captured.append(args[1:4])  # (rotary, mask, causal), as the tower computed them for this prompt

        batch = len(tokens)
        n_pos = tokens.shape[-1]
        kv = model.new_kv_cache(batch, n_pos, model.block_devices(), model.embed.W_E.dtype)
        handle = tower.blocks[0].register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                logits, cache = model.run_with_cache(
                    tokens, names_filter=lambda name: name.endswith("hook_resid_pre") and name.startswith("blocks."),
                    cache=kv, return_cache_object=False,
                )
        finally:
            handle.remove()
        resid_pre = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(tower.cfg.n_layers)]
        if logits.shape[:2] != (batch, n_pos) or resid_pre[0].shape[1] != n_pos or kv.length != n_pos:
            return None  # the language positions are not the token positions
        # Patterns and scores are [batch, head, q, k]: their axis 1 is no position.
        per_position = setter in _PER_POSITION and activation_name not in ("pattern", "attn_scores")
        return cls(model, resid_pre, kv, logits, captured[0], per_position)

    def run(self, hooks: list, layer: int, first: int, n: int, keep: int = 0) -> list[LazyLogits]:
        """Logits of each of ``n`` copies of the corrupted batch with ``hooks`` attached, computed from block
        ``layer`` on for positions ``first:`` (the hooks see activations of those positions only) and unembedded
        where the metric reads them (lazy_logits.py). ``keep``: only the last ``keep`` positions' logits, the
        others NaN (0: all)."""
        tower, batch, n_pos = self.vlm.language, self.logits.shape[0], self.logits.shape[1]
        resid = _rows(self.resid_pre[layer][:, first:], n, batch)
        rotary = None if self.rotary is None else tuple(_rows(t[:, first:], n, batch) for t in self.rotary)
        mask, causal = self._suffix_mask(first, n_pos, n, batch, resid.device)
        with self.vlm.hooks(fwd_hooks=hooks):
            for i in range(layer, tower.cfg.n_layers):
                past = self.kv[i]
                entry = KVCacheEntry(n * batch, past.k.shape[1], n_pos, past.k.shape[3], past.k.dtype, past.k.device)
                entry.k[:, :, :first], entry.v[:, :, :first] = _rows(past.k[:, :, :first], n, batch), _rows(past.v[:, :, :first], n, batch)
                entry.length = first
                resid = tower.blocks[i](resid, rotary, mask, causal, entry)
        return [LazyLogits(self.logits, resid[j * batch : (j + 1) * batch], first, keep, self.unembed) for j in range(n)]

    def unembed(self, resid: Tensor) -> Tensor:
        tower = self.vlm.language
        return tower.unembed(tower.ln_final(resid))

    def _suffix_mask(self, first: int, n_pos: int, n: int, batch: int, device) -> tuple[Tensor | None, bool]:
        """The mask of queries ``first:`` over all keys: the prompt's own mask, or the causal one it stood for."""
        if self.mask is not None:
            return _rows(self.mask[:, :, first:], n, batch), False
        if not self.causal or first == 0:
            return None, self.causal
        q = torch.arange(first, n_pos, device=device)[:, None]
        return (torch.arange(n_pos, device=device)[None, :] <= q)[None, None], False


def _rows(t: Tensor, n: int, batch: int) -> Tensor:
    """``n`` copies of a per-row tensor along the batch (a broadcast first dimension stays)."""
    if n == 1 or t.shape[0] != batch:
        return t
    return t.repeat(n, *([1] * (t.ndim - 1)))
