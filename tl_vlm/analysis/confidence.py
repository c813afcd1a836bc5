"""Internal confidence of object words read off image positions (Jiang et al. 2025), and zero-shot localisation.

p_{l,m} is the logit-lens distribution (``logit_lens``) of HF's ``hidden_states[l]`` for l = 0..n (the stream
entering block l; for l = n the final stream through ``ln_final``) at image position m (BLIP-2: the query
outputs): ``softmax(unembed(hidden_states[l]))``. The paper's variant, the default here, keeps the top-k=50
logits renormalised (their LLaVA code; their BLIP code keeps all: ``top_k=None``); ``normed=True`` also puts
layers below n through ``ln_final``. A word's sub-tokens are its tokenizer encoding without special tokens (the
paper's ``tokenizer.encode(word)[1:]``, which drops the BOS).

- ``confidence_map``: max over the word's sub-tokens -> [layer, batch, image token] (plot it as a heatmap).
- ``internal_confidence``: c(o) = max over sub-tokens, layers and image positions.
- ``localization``: max over sub-tokens and layers, placed on each image's pixels through the spatial index
  (BLIP-2 queries have no cell: each query's score is spread over the patches it cross-attends to).

Words are one string or a list of strings; a word the tokenizer maps to its unknown token is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tl_vlm.analysis.logit_lens import hidden_state, image_positions, lens_hook_names, lens_probs
from tl_vlm.analysis.spatial import spatial_index
from tl_vlm.inputs import VLMInputs


def object_token_ids(model, word: str) -> list[int]:
    """The word's sub-tokens: the tokenizer's encoding without BOS (or any other special token)."""
    ids = model.tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{word!r} encodes to no tokens")
    unk = model.tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise ValueError(
            f"{word!r} is not in the vocabulary: the tokenizer maps (part of) it to the unknown token "
            f"{model.tokenizer.unk_token!r}, whose probability says nothing about the word"
        )
    return ids


def image_token_probs(
    model, inputs: VLMInputs, token_ids: list[int], normed: bool = False, top_k: int | None = 50
) -> Float[Tensor, "layer batch image token"]:
    """p_{l,m}[token] for the given tokens at every image position; one forward pass, one layer at a time
    (the full [layer, position, vocab] tensor of a 7B model would not fit)."""
    mask = image_positions(model, inputs.input_ids.to(model.device))
    counts = mask.sum(-1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"rows hold {counts.tolist()} image tokens; pass rows with equal counts (or one row at a time)")
    names = lens_hook_names(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names)
        at_images = {name: cache[name][mask].view(mask.shape[0], -1, model.cfg.d_model) for name in names}
        ids = torch.tensor(token_ids, device=model.device)
        return torch.stack(
            [lens_probs(model, hidden_state(model, at_images, layer, normed), False, top_k)[..., ids]
             for layer in range(model.cfg.n_layers + 1)]
        )


def word_probs(
    model, inputs: VLMInputs, words: Sequence[str], normed: bool = False, top_k: int | None = 50
) -> Float[Tensor, "layer batch image word"]:
    """Max over each word's sub-tokens of p_{l,m} (one forward for all words)."""
    per_word = [object_token_ids(model, word) for word in words]
    union = sorted({i for ids in per_word for i in ids})
    probs = image_token_probs(model, inputs, union, normed, top_k)
    column = {token: k for k, token in enumerate(union)}
    return torch.stack([probs[..., [column[i] for i in ids]].amax(-1) for ids in per_word], dim=-1)


def confidence_map(
    model, inputs: VLMInputs, words: str | Sequence[str], normed: bool = False, top_k: int | None = 50
) -> Float[Tensor, "layer batch image *word"]:
    """Max over the word's sub-tokens of p_{l,m}: the layer x image-position heatmap ([layer, batch, image] for
    one word, a trailing word axis for a list)."""
    probs = word_probs(model, inputs, [words] if isinstance(words, str) else words, normed, top_k)
    return probs[..., 0] if isinstance(words, str) else probs


def internal_confidence(
    model, inputs: VLMInputs, words: str | Sequence[str], normed: bool = False, top_k: int | None = 50
) -> Float[Tensor, "batch *word"]:
    """c(o) for each word and row: max over sub-tokens, layers and image positions ([batch] for one word,
    [batch, word] for a list)."""
    return confidence_map(model, inputs, words, normed, top_k).amax(dim=(0, 2))


def localization(
    model, inputs: VLMInputs, word: str, images, normed: bool = False, top_k: int | None = 50
) -> list[Float[Tensor, "height width"]]:
    """One map per image, in the original image's pixels: each image token's max over sub-tokens and layers,
    painted over its pixel box (max where boxes overlap)."""
    scores = confidence_map(model, inputs, word, normed, top_k).amax(0)  # [batch, image token], placeholder order
    if model.capabilities.queries:
        return query_localization(model, inputs, scores, images)
    index = spatial_index(model, inputs, images)
    index["score"] = scores.flatten().cpu().tolist()
    maps = [torch.zeros(image.size[1], image.size[0]) for image in images]
    for row in index[index["kind"] == "patch"].itertuples():
        y0, y1, x0, x1 = (int(round(v)) for v in (row.y0, row.y1, row.x0, row.x1))
        cell = maps[row.image][y0:y1, x0:x1]
        cell.copy_(cell.clamp(min=row.score))
    return maps


def query_localization(
    model, inputs: VLMInputs, scores: Float[Tensor, "batch query"], images
) -> list[Float[Tensor, "height width"]]:
    """Per-query scores as maps over each image's pixels: each query's score times what it reads from each patch
    (mean over the Q-Former's cross-attention layers and heads)."""
    from tl_vlm.families.blip2 import query_patch_attention

    with torch.no_grad():
        _, cache = model.run_with_cache(model.scoring_inputs(inputs), names_filter=lambda n: "cross_attn.hook_pattern" in n)
    reads = query_patch_attention(model, cache).mean(dim=(0, 2))  # [image, query, grid_h, grid_w]
    grids = torch.einsum("iq,iqhw->ihw", scores.to(reads.dtype), reads)
    return [
        F.interpolate(grid[None, None].float(), size=(image.size[1], image.size[0]), mode="bilinear")[0, 0].cpu()
        for grid, image in zip(grids, images)
    ]
