"""ProjectAway (Jiang et al. 2025): erase objects from the image representations by orthogonalising them
against the objects' text directions.

Text direction t of an object: the language stream entering layer ``text_layer`` (HF's
``hidden_states[text_layer]``) at the last token of the word run alone after BOS (no image). Edit: on the
output of layer ``image_layer`` (``blocks.{image_layer}.hook_resid_post``), at image positions only, for each
object in turn and each image token h with p = <h, t> / <t, t> > 0: h <- h - alpha * p * t.

    edit = ProjectAway(model, ["dog"], text_layer=1, image_layer=2)
    with edit.applied(inputs):
        tokens = model.generate(inputs, max_new_tokens=40)

The edit acts on passes that cover the prompt (the prefill; every step when generating without a KV cache,
which recomputes the same edited states); KV-cached decode steps reuse the edited image states as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analysis.hallucination import extract_mentions
from tl_vlm.analysis.logit_lens import image_positions
from tl_vlm.inputs import VLMInputs


def text_direction(model, word: str, layer: int = 1) -> Float[Tensor, " d_model"]:
    """The stream entering ``layer`` (``layer == n_layers``: the final stream) at the word's last token, run alone."""
    ids = model.tokenizer.encode(word, add_special_tokens=False)
    if model.tokenizer.bos_token_id is not None:
        ids = [model.tokenizer.bos_token_id, *ids]
    n = model.cfg.n_layers
    name = f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names_filter=name)
    return cache[name][0, -1]


def project_away(
    hidden: Float[Tensor, "... d_model"], directions: Float[Tensor, "object d_model"], alpha: float = 1.5
) -> Float[Tensor, "... d_model"]:
    """h <- h - alpha * max(p, 0) * t with p = <h, t> / <t, t>, for each direction t in turn."""
    for t in directions.to(hidden.dtype):
        p = (hidden @ t / (t @ t)).clamp(min=0)
        hidden = hidden - alpha * p[..., None] * t
    return hidden


class ProjectAway:
    """The edit for a list of objects; ``applied(inputs)`` is the context in which runs and ``generate`` see it."""

    def __init__(self, model, objects: Sequence[str], text_layer: int = 1, image_layer: int = 2, alpha: float = 1.5):
        if not 0 <= image_layer < model.cfg.n_layers - 1:
            raise ValueError(
                f"image_layer {image_layer}: the edit needs a later block to read the edited image positions; use a "
                f"layer from 0 to {model.cfg.n_layers - 2} of this {model.cfg.n_layers}-layer language model"
            )
        self.model, self.objects, self.alpha = model, list(objects), alpha
        self.hook_name = f"blocks.{image_layer}.hook_resid_post"
        self.directions = torch.stack([text_direction(model, word, text_layer) for word in self.objects])

    @contextmanager
    def applied(self, inputs: VLMInputs) -> Iterator[None]:
        mask = image_positions(self.model, inputs.input_ids.to(self.model.device))

        def edit(resid, hook):
            if resid.shape[1] < mask.shape[1]:
                return resid  # a KV-cached decode step: no image positions in this pass
            at = torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device)
            at[:, : mask.shape[1]] = mask
            resid[at] = project_away(resid[at], self.directions, self.alpha)
            return resid

        with self.model.hooks(fwd_hooks=[(self.hook_name, edit)]):
            yield


def captions(model, inputs: VLMInputs, **generate_kwargs) -> list[str]:
    """The generated continuation of each row, decoded without special tokens."""
    tokens = model.generate(inputs, **generate_kwargs)
    return model.tokenizer.batch_decode(tokens[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def removal_report(
    model, edit: ProjectAway, inputs: Sequence[VLMInputs], vocabulary=None, **generate_kwargs
) -> pd.DataFrame:
    """Per object: the fraction of captions mentioning it without and with the edit (``vocabulary`` as in
    ``extract_mentions``; default: each object's own word)."""
    vocabulary = vocabulary if vocabulary is not None else edit.objects
    before, after = [], []
    for row in inputs:
        before += captions(model, row, **generate_kwargs)
        with edit.applied(row):
            after += captions(model, row, **generate_kwargs)
    rates = {}
    for name, texts in (("mentioned_before", before), ("mentioned_after", after)):
        mentions = extract_mentions(texts, vocabulary)
        rates[name] = [mentions.loc[mentions["object"] == obj, "caption"].nunique() / len(texts) for obj in edit.objects]
    return pd.DataFrame({"object": edit.objects, **rates, "captions": len(before)})
