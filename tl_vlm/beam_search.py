"""Beam search, hypothesis for hypothesis as HF's ``generate`` runs it (transformers' vectorised ``_beam_search``).

Each row advances ``num_beams`` hypotheses together. A step scores every continuation of every running beam by
its summed log-probability (``log_softmax`` of the logits, then the logits processors), keeps the best
``max(2, 1 + n_end_tokens) * num_beams`` so that enough stay unfinished, moves those among the best
``num_beams`` that end (an end token, or the length limit) to the row's finished set, scored
sum / generated_length ** ``length_penalty`` (the finished set keeps its best ``num_beams``), and continues
with the best ``num_beams`` unfinished ones. A row stops taking hypotheses when HF's heuristic says no running
beam can beat its worst finished one (``early_stopping`` False: at the current length; "never" with a positive
penalty: at the maximum length) or, with ``early_stopping=True``, once ``num_beams`` are finished; the search
stops when no row can improve or every candidate ended. Each row returns its best ``num_return_sequences``
finished hypotheses, best first, filled after their end as HF fills them.

The model is two callbacks: ``step(tokens, ids)`` runs each beam's new token (``ids``: the beams' sequences,
ending with it) and returns the next logits; ``select(rows)`` keeps the model's per-row state (KV cache,
attention mask, positions) for ``rows`` in that order: first to copy each prompt pass to its row's beams, then
after every step so each beam continues from its parent's cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import GenerationConfig

from tl_vlm.sampling import eos_ids, logits_processors

EXCLUDED = -1.0e9  # HF's score for hypotheses that must not be chosen (the same constant keeps ties as HF's)


def beam_search(
    logits: Float[Tensor, "batch pos d_vocab"],
    ids: Int[Tensor, "batch pos"],
    n_new: int,
    settings: GenerationConfig,
    prompt_mask: Int[Tensor, "batch pos"],
    step: Callable[[Int[Tensor, " beam_row"], Int[Tensor, "beam_row pos"]], Tensor],
    select: Callable[[Int[Tensor, " beam_row"]], None],
) -> Int[Tensor, "batch_return pos"]:
    """The best ``num_return_sequences`` hypotheses of each row (rows in order, best first), prompt included."""
    batch, prompt_len = ids.shape
    beams, penalty, early = settings.num_beams, settings.length_penalty, settings.early_stopping
    max_len = prompt_len + n_new
    eos_list = eos_ids(settings)
    eos = torch.tensor(eos_list, dtype=torch.long, device=ids.device)
    n_kept = max(2, 1 + len(eos_list)) * beams
    in_top = torch.arange(n_kept, device=ids.device) < beams
    # As HF: a pad id of 0 (or none) falls back to the first end token; without end tokens nothing is filled.
    fill = (settings.pad_token_id or eos_list[0]) if eos_list else -1

    rows = torch.arange(batch, device=ids.device).repeat_interleave(beams)
    select(rows)
    logits = logits[rows]
    processors = logits_processors(settings, prompt_mask[rows], eos_list)

    running = ids.new_full((batch, beams, max_len), fill)
    running[:, :, :prompt_len] = ids[:, None]
    running_scores = torch.zeros(batch, beams, device=ids.device)
    running_scores[:, 1:] = EXCLUDED  # only the first beam's continuations at the first step: no duplicates
    finished = running.clone()
    finished_scores = torch.full((batch, beams), EXCLUDED, device=ids.device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=ids.device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=ids.device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=ids.device)

    for cur in range(prompt_len, max_len):
        log_probs = processors(running[:, :, :cur].flatten(0, 1), torch.log_softmax(logits[:, -1].float(), dim=-1))
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, beams * vocab)
        scores, flat = totals.topk(n_kept)
        parents, tokens = flat // vocab, flat % vocab
        candidates = _take(running, parents)
        candidates[:, :, cur] = tokens
        ends = torch.isin(tokens, eos) | (cur + 1 >= max_len)

        live_scores = scores + ends.float() * EXCLUDED
        best = live_scores.topk(beams).indices
        running, running_scores, running_parents = _take(candidates, best), _take(live_scores, best), _take(parents, best)

        new_finished = ends & in_top
        final = scores / (cur + 1 - prompt_len) ** penalty
        final += (is_finished.all(-1, keepdim=True) & (early is True)).float() * EXCLUDED
        final += (~improvable).float() * EXCLUDED
        final += (~new_finished).float() * EXCLUDED
        keep = torch.cat([finished_scores, final], dim=1).topk(beams).indices
        finished = _take(torch.cat([finished, candidates], dim=1), keep)
        finished_scores = _take(torch.cat([finished_scores, final], dim=1), keep)
        finished_lengths = _take(torch.cat([finished_lengths, torch.full_like(tokens, cur + 1 - prompt_len)], dim=1), keep)
        is_finished = _take(torch.cat([is_finished, new_finished], dim=1), keep)

        select((running_parents + beams * torch.arange(batch, device=ids.device)[:, None]).flatten())
        reachable = max_len - prompt_len if early == "never" and penalty > 0.0 else cur + 1 - prompt_len
        best_running = running_scores[:, :1] / reachable**penalty
        worst_finished = torch.where(is_finished, finished_scores.min(-1, keepdim=True).values, EXCLUDED)
        improvable &= (best_running > worst_finished).any(-1, keepdim=True)
        if not improvable.any() or (bool(is_finished.all()) and early is True) or bool(ends.all()):
            break
        logits = step(running[:, :, cur].flatten(), running[:, :, : cur + 1].flatten(0, 1))

    n_return = settings.num_return_sequences
    return finished[:, :n_return].flatten(0, 1)[:, : prompt_len + int(finished_lengths[:, :n_return].max())]


def _take(tensor: Tensor, index: Int[Tensor, "batch k"]) -> Tensor:
    """Entries ``index`` along the beam axis (dim 1) of each row."""
    return tensor.take_along_dim(index.view(*index.shape, *[1] * (tensor.ndim - 2)), dim=1)
