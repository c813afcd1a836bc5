"""ProjectAway (Jiang et al. 2025): erase objects from the image representations by orthogonalising them
against the objects' text directions.

Layers are numbered as in the paper's code (its demo: ``lT=1, lI=2``):

- text direction t of an object: HF's ``hidden_states[text_layer]`` (the stream entering block ``text_layer``;
  ``text_layer == n_layers``: the final stream through ``ln_final``) at the last token of the word run alone
  after BOS (no image);
- edit: on the output of decoder layer ``image_layer`` (where the paper's forward hook on
  ``model.layers[lI]`` acts: HF's ``hidden_states[image_layer + 1]``, ``blocks.{image_layer}.hook_resid_post``),
  at image positions only, for each object in turn and each image token h with p = <h, t> / <t, t> > 0:
  h <- h - alpha * p * t.

``image_layer="input"`` edits the image tokens as they enter the language model (the projector's output, HF's
``hidden_states[0]``, ``blocks.0.hook_resid_pre``): for a model that reads the image in its first blocks, where
no decoder layer's output still holds what to erase.

Negative indices count from the end, as Python indexing in the paper's code does. The last decoder layer is
refused as ``image_layer``: no later block reads its image positions, so the edit could not change any output
(the paper's code runs it as a no-op).

    edit = ProjectAway(model, ["dog"], text_layer=1, image_layer=2)
    with edit.applied(inputs):
        tokens = model.generate(inputs, max_new_tokens=40)

The edit acts on passes that cover the prompt (the prefill; every step when generating without a KV cache,
which recomputes the same edited states); KV-cached decode steps reuse the edited image states as they are, in
every beam of a beam search (the beams of a row share its prompt pass, as they share HF's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analysis.hallucination import extract_mentions
from tl_vlm.analysis.logit_lens import hidden_state, image_positions, lens_hook_names
from tl_vlm.inputs import VLMInputs


def text_direction(model, word: str, layer: int = 1) -> Float[Tensor, " d_model"]:
    """HF's ``hidden_states[layer]`` at the word's last token, run alone after BOS (``layer == n_layers``: the
    final stream through ``ln_final``; negative: from the end)."""
    layer = _checked_layer(layer, model.cfg.n_layers + 1, "text_layer", "HF hidden_states")
    ids = model.tokenizer.encode(word, add_special_tokens=False)
    if model.tokenizer.bos_token_id is not None:
        ids = [model.tokenizer.bos_token_id, *ids]
    names = lens_hook_names(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names_filter=names[layer])
        return hidden_state(model, cache, layer)[0, -1]


def _checked_layer(layer: int, count: int, what: str, numbering: str) -> int:
    """``layer`` as an index into ``count`` entries (negative from the end, as Python indexing)."""
    if not -count <= layer < count:
        raise ValueError(f"{what} {layer}: this model has {count} {numbering} (indices {-count} to {count - 1})")
    return layer % count


def project_away(
    hidden: Float[Tensor, "... d_model"], directions: Float[Tensor, "object d_model"], alpha: float = 1.5
) -> Float[Tensor, "... d_model"]:
    """h <- h - alpha * max(p, 0) * t with p = <h, t> / <t, t>, for each direction t in turn."""
    for t in directions.to(hidden.dtype):
        p = (hidden @ t / (t @ t)).clamp(min=0)
        hidden = hidden - alpha * p[..., None] * t
    return hidden


class ProjectAway:
    """The edit for an object or a list of objects; ``applied(inputs)`` is the context in which runs and
    ``generate`` see it."""

    def __init__(self, model, objects: str | Sequence[str], text_layer: int = 1,
                 image_layer: int | Literal["input"] = 2, alpha: float = 1.5):
        n = model.cfg.n_layers
        if image_layer == "input":
            self.hook_name = "blocks.0.hook_resid_pre"
        elif isinstance(image_layer, str):
            raise ValueError(f"image_layer {image_layer!r}: pass a decoder layer index or 'input' (the LM's input)")
        else:
            image_layer = _checked_layer(image_layer, n, "image_layer", "decoder layers")
            self.hook_name = f"blocks.{image_layer}.hook_resid_post"
        if image_layer == n - 1:
            raise ValueError(
                f"image_layer {image_layer} is the last decoder layer: the edit needs a later block to read the edited "
                f"image positions (the paper's code runs it as a no-op); use a layer from 0 to {n - 2} of this "
                f"{n}-layer language model"
            )
        self.model, self.alpha = model, alpha
        self.objects = [objects] if isinstance(objects, str) else list(objects)
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
