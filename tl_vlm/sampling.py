"""Generation settings and next-token choice, resolved exactly as HF's ``generate`` resolves them.

Precedence: the call's arguments, then the checkpoint's ``generation_config``, then HF's global
defaults (e.g. ``top_k=50`` when sampling). Logits processors and warpers are transformers' own.
Greedy and sampled tokens come from ``decode`` here; ``num_beams > 1`` is beam search (tl_vlm/beam_search.py,
greedy beams). Settings neither implements (beam sampling, n-gram blocking, ...) are an error, not ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_SUPPORTED = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "repetition_penalty", "use_cache", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
}


def resolve_settings(model_config: GenerationConfig, **overrides) -> GenerationConfig:
    settings = copy.deepcopy(model_config)
    settings.update(**{k: v for k, v in overrides.items() if v is not None})
    defaults = GenerationConfig._get_default_generation_params()
    for key, value in defaults.items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    changed = sorted(k for k, v in defaults.items() if k not in _SUPPORTED and getattr(settings, k) != v)
    if changed:
        raise NotImplementedError(
            f"generation settings {changed} are not implemented by HookedVLM.generate; reset them "
            "(e.g. model.generation_config.no_repeat_ngram_size = 0) or use the HF model's generate"
        )
    if settings.num_beams > 1 and settings.do_sample:
        raise NotImplementedError("beam sampling (num_beams > 1 with do_sample=True); use greedy beams or sampling")
    if settings.num_beams == 1 and settings.num_return_sequences > 1:
        raise NotImplementedError(
            "num_return_sequences > 1 without beams (several samples per prompt); repeat the prompt's rows instead"
        )
    return settings


def logits_processors(
    settings: GenerationConfig, prompt_mask: Int[Tensor, "batch pos"], eos: list[int]
) -> LogitsProcessorList:
    """HF's processors then warpers, in HF's order, for the settings in use."""
    processors = LogitsProcessorList()
    prompt_len = prompt_mask.shape[1]
    if settings.repetition_penalty != 1.0:
        # As HF: left padding is not a repetition.
        padding = (prompt_mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, prompt_ignore_length=padding))
    if settings.min_length and eos:
        processors.append(MinLengthLogitsProcessor(settings.min_length, eos))
    if settings.min_new_tokens and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, settings.min_new_tokens, eos))
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def next_token(
    logits: Float[Tensor, "batch d_vocab"],
    ids: Int[Tensor, "batch pos"],
    settings: GenerationConfig,
    processors: LogitsProcessorList,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    scores = processors(ids, logits)
    if not settings.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def eos_ids(settings: GenerationConfig) -> list[int]:
    eos = settings.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def decode(
    logits: Float[Tensor, "batch pos d_vocab"],
    ids: Int[Tensor, "batch pos"],
    n_new: int,
    settings: GenerationConfig,
    prompt_mask: Int[Tensor, "batch pos"],
    generator: torch.Generator | None,
    step: Callable[[Int[Tensor, " batch"], Int[Tensor, "batch pos"]], Tensor],
) -> Int[Tensor, "batch pos"]:
    """HF's token loop: choose the next token from the last logits, pad finished rows, stop when every row has
    emitted an end token or ``n_new`` tokens are out. ``step(token, ids)`` runs the model on the new token (``ids`` holds it already) and
    returns the next logits."""
    eos_list = eos_ids(settings)
    eos = torch.tensor(eos_list, dtype=torch.long, device=ids.device)
    pad = settings.pad_token_id if settings.pad_token_id is not None else (eos_list[0] if eos_list else 0)
    processors = logits_processors(settings, prompt_mask, eos_list)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for i in range(n_new):
        token = next_token(logits[:, -1].float(), ids, settings, processors, generator).masked_fill(finished, pad)
        ids = torch.cat([ids, token[:, None]], dim=-1)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or i == n_new - 1:  # as HF: no forward pass after the last token
            break
        logits = step(token, ids)
    return ids
