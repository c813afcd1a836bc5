"""A model's HF module names (today's spelling or older transformers', as VLM-Lens configs write them), what holds
each one's output here, and those outputs from one forward pass.

The table comes from the family (``hf_module_rules`` and ``legacy_module_prefixes``; see
``convert/hf_modules.py``). A target is a hook point (read from the cache) or one of our modules (read with a
PyTorch forward hook on it: norm outputs, the logits of ``unembed``); forward hooks on our norms and unembedding
are not hook points, so they switch no explicit path and the numbers stay the plain forward's.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from tl_vlm.convert.hf_modules import expand


@dataclass(frozen=True)
class HFName:
    name: str  # HF's module name in the installed transformers
    legacy: str | None  # the same module as transformers < 4.52 named it (None: unchanged)
    target: str  # the hook point or module of ours with the same output

    def spellings(self) -> tuple[str, ...]:
        return (self.name,) if self.legacy is None else (self.name, self.legacy)


def hf_names(model) -> list[HFName]:
    """Every HF module of ``model``'s architecture that has an equivalent here, in HF's order per block."""
    family = type(model)
    towers = {name: tower.cfg for name, tower in model.towers().items()}
    table = expand(family.hf_module_rules(model.vlm_cfg), towers)
    return [HFName(name, _legacy(family.legacy_module_prefixes, name), target) for name, target in table.items()]


def _legacy(prefixes: tuple[tuple[str, str], ...], name: str) -> str | None:
    for today, older in prefixes:
        if name == today or name.startswith(today + "."):
            return older + name[len(today):]
    return None


def select_hf_modules(model, patterns: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``patterns`` (regular expressions or globs, fully matched) into HF module selections and the rest.

    Returns ``{name as the pattern matched it: target}`` and the patterns that match no HF module name (hook-name
    patterns, for ``select_hooks``). A pattern matching both HF module names and hook names is refused: which
    one was meant cannot be told."""
    table = hf_names(model)
    chosen: dict[str, str] = {}
    rest = []
    for pattern in patterns:
        regex = re.compile(pattern)

        def hit(name: str) -> bool:
            return regex.fullmatch(name) is not None or fnmatch.fnmatchcase(name, pattern)

        hits = {}
        for entry in table:
            spelled = next((s for s in entry.spellings() if hit(s)), None)
            if spelled is not None:
                hits[spelled] = entry.target
        if not hits:
            rest.append(pattern)
            continue
        hooks = [n for n in model.hook_dict if hit(n)]
        if hooks:
            raise ValueError(
                f"module pattern {pattern!r} matches HF module names ({sorted(hits)[:3]}) and hook names "
                f"({hooks[:3]}); make it match one kind"
            )
        chosen.update(hits)
    return chosen, rest


def unknown_module_message(model, pattern: str) -> str:
    """Why ``pattern`` matched nothing, with the closest HF module names and hook names."""
    names = [s for entry in hf_names(model) for s in entry.spellings()]
    close = difflib.get_close_matches(pattern, names + list(model.hook_dict), n=5, cutoff=0.4)
    return (
        f"module pattern {pattern!r} matches no hook name and no HF module with an equivalent here; close names: "
        f"{close} (tl-vlm hooks MODEL --hf-names lists the HF modules tl_vlm maps; q/k/v projections and "
        "embedding tables have none: use the hook names)"
    )


def is_module_target(model, target: str) -> bool:
    """A target read from a module's output (not a hook point)."""
    return target not in model.hook_dict


def run_with_outputs(model, inputs, targets: list[str], **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass: the logits and each target's activation (hook points from the cache, modules from a
    forward hook on them). ``kwargs`` go to ``run_with_cache``."""
    hooks = [t for t in targets if not is_module_target(model, t)]
    captured: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(t).register_forward_hook(lambda m, i, o, t=t: captured.__setitem__(t, o))
        for t in targets
        if is_module_target(model, t)
    ]
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n in hooks, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [t for t in targets if t not in captured and t not in cache.cache_dict]
    if missing:
        raise ValueError(f"{missing} did not run on this input (a text-only prompt runs no vision tower)")
    return logits, {t: captured[t] if t in captured else cache.cache_dict[t] for t in targets}
