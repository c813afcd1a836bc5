"""TransformerLens' ActivationCache, counting the residual components TL's own blocks do not have.

Qwen3-VL's DeepStack adds visual features to the output of the first ``cfg.deepstack_layers`` language blocks
(``blocks.{k}.hook_deepstack``, see ``towers/deepstack.py``). TL's ``decompose_resid`` sums embeddings, attention and
MLP outputs only, so here each DeepStack term is one more component, labelled ``{k}_deepstack`` and placed after
block ``k``'s MLP output: ``decompose_resid`` (mode "all") and ``get_full_resid_decomposition`` then sum exactly to
the residual stream. ``accumulated_resid`` reads ``hook_resid_pre`` of each block, which already holds the term.
A model without DeepStack (``deepstack_layers == 0``) gets TL's results unchanged.
"""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice


class VLMActivationCache(ActivationCache):
    def _deepstack_stack(self, layer: int, pos_slice: Slice) -> tuple[list[torch.Tensor], list[str]]:
        """The DeepStack terms that entered the stream before block ``layer`` (TL's layer numbering)."""
        n = min(layer, self.model.cfg.deepstack_layers)
        missing = [k for k in range(n) if f"blocks.{k}.hook_deepstack" not in self.cache_dict]
        if missing:
            raise KeyError(
                f"the residual stream holds DeepStack terms blocks.{{k}}.hook_deepstack for k in {missing}, which this "
                "cache lacks; cache them too (names_filter) so the decomposition stays exact"
            )
        return [pos_slice.apply(self[f"blocks.{k}.hook_deepstack"], dim=-2) for k in range(n)], [
            f"{k}_deepstack" for k in range(n)
        ]

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):
        """TL's ``decompose_resid``; with mode "all", each DeepStack term follows its block's MLP output."""
        if not self.model.cfg.deepstack_layers or mode != "all":
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        components, labels = super().decompose_resid(layer, mlp_input, mode, False, pos_slice, incl_embeds, True)
        extra, extra_labels = self._deepstack_stack(layer, pos_slice)
        parts, names = list(components), list(labels)
        for term, label in zip(extra, extra_labels):
            at = names.index(f"{label.split('_')[0]}_mlp_out") + 1
            parts.insert(at, term)
            names.insert(at, label)
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, names) if return_labels else stack

    def get_full_resid_decomposition(self, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False,
                                     pos_slice=None, return_labels=False, project_output_onto=None):
        """TL's full decomposition (heads, neurons or MLPs, embeddings, biases), then the DeepStack terms."""
        stack, labels = super().get_full_resid_decomposition(
            layer, mlp_input, expand_neurons, apply_ln, pos_slice, True, project_output_onto
        )
        if self.model.cfg.deepstack_layers:
            layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
            pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
            extra, extra_labels = self._deepstack_stack(layer, pos_slice)
            if extra:
                terms = torch.stack(extra)
                if apply_ln:
                    terms = self.apply_ln_to_stack(terms, layer, pos_slice=pos_slice, mlp_input=mlp_input)
                if project_output_onto is not None:
                    terms = terms @ project_output_onto
                stack, labels = torch.cat([stack, terms.to(stack.dtype)]), labels + extra_labels
        return (stack, labels) if return_labels else stack
