"""Tower views: one tower of a HookedVLM presented as a TransformerLens model.

``model.tower("vision")`` has the tower's ``cfg``, ``blocks`` and weights, hook names relative to the
tower (``blocks.3.hook_resid_pre`` means ``vision.blocks.3.hook_resid_pre``), and ``run_with_hooks`` /
``run_with_cache`` that run the WHOLE VLM, images attached. So ``transformer_lens.patching`` functions
and ``ActivationCache`` methods work on any tower unchanged:

    vision = model.tower("vision")
    corrupt_v = vision.inputs(corrupt)                       # shape = [image, patch]: TL's "batch, pos"
    _, clean_cache = vision.run_with_cache(clean)
    patching.get_act_patch_resid_pre(vision, corrupt_v, clean_cache, metric)   # [vision_layer, patch]

In a non-language tower's view, ``hook_embed`` is the stream entering block 0 (for CLIP: after
``ln_pre``, which is not additive), so ``decompose_resid()`` sums exactly to the residual stream; the
tower's raw ``hook_embed`` / ``hook_pos_embed`` stay reachable under their full names on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformer_lens import ActivationCache

from tl_vlm.activation_cache import VLMActivationCache
from tl_vlm.inputs import VLMInputs

if TYPE_CHECKING:
    from tl_vlm.hooked_vlm import HookedVLM


_HIDDEN = ("hook_embed", "hook_pos_embed")


@dataclass
class TowerInputs:
    """VLM inputs whose ``shape`` is the tower's ``[batch, pos]`` (images x patches for vision). Rows are images;
    taking some of them (as TL's tools do, ``tokens[i:i + 1]``) takes their prompts, where each prompt holds one
    image."""

    inputs: VLMInputs
    shape: torch.Size

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device) -> "TowerInputs":
        return TowerInputs(self.inputs.to(device), self.shape)

    def __getitem__(self, index) -> "TowerInputs":
        rows = torch.arange(len(self))[index].reshape(-1).tolist()
        if rows == list(range(len(self))):
            return self
        if len(self) != len(self.inputs) or self.inputs.ndim != 2:
            raise ValueError(
                f"these {len(self)} tower rows come from {len(self.inputs)} prompts, so a subset of rows is not a subset "
                "of prompts; index the VLMInputs (one image per prompt) and call tower.inputs on the result"
            )
        return TowerInputs(self.inputs[rows], torch.Size([len(rows), *self.shape[1:]]))


class TowerView:
    def __init__(self, model: "HookedVLM", name: str):
        towers = model.towers()
        if name not in towers:
            raise KeyError(f"no tower {name!r}; this model has {sorted(towers)}")
        self.model, self.name, self.tower = model, name, towers[name]
        self.cfg = self.tower.cfg
        self.prefix = "" if name == "language" else f"{name}."
        self._others = tuple(f"{n}." for n in {*towers, "projector"} if n != "language")

    def __getattr__(self, attr: str) -> Any:
        # blocks, W_Q, OV, ln_final, ... come from the tower; the language view also has the model's
        # token helpers (to_single_token, tokens_to_residual_directions with strings, ...).
        if attr.startswith("__"):
            raise AttributeError(attr)
        if not self.prefix and not hasattr(self.tower, attr):
            return getattr(self.model, attr)
        return getattr(self.tower, attr)

    def __repr__(self) -> str:
        return f"TowerView({self.name!r} of {self.model.vlm_cfg.architecture})"

    # TL's switches, for this tower (per-head results: every tower, as the model's).
    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self.model.set_use_split_qkv_input(use_split_qkv_input, tower=self.name)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        self.model.set_use_hook_mlp_in(use_hook_mlp_in, tower=self.name)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        self.model.set_use_attn_result(use_attn_result)

    # ---------------------------------------------------------------- names

    def full_name(self, name: str) -> str:
        if self.prefix and name == "hook_embed":
            return f"{self.prefix}blocks.0.hook_resid_pre"
        return self.prefix + name

    def relative_name(self, full: str) -> str | None:
        if not self.prefix:
            return None if full.startswith(self._others) else full
        if not full.startswith(self.prefix):
            return None
        rel = full[len(self.prefix):]
        # The tower's own pre-block embeddings are hidden: TL's hook_embed here is the block-0 input.
        return None if rel in _HIDDEN else rel

    @property
    def hook_dict(self) -> dict:
        names = {rel: hp for full, hp in self.model.hook_dict.items() if (rel := self.relative_name(full)) is not None}
        if self.prefix:
            names["hook_embed"] = self.model.hook_dict[self.full_name("hook_embed")]
        return names

    def _names(self, names: str | Callable[[str], bool]) -> list[str]:
        if isinstance(names, str):
            return [self.full_name(names)]
        return [self.full_name(rel) for rel in self.hook_dict if names(rel)]

    # ---------------------------------------------------------------- inputs

    def _unwrap(self, input: Any) -> Any:
        inputs = input.inputs if isinstance(input, TowerInputs) else input
        if self.prefix and not (isinstance(inputs, VLMInputs) and (
            inputs.pixel_values is not None or inputs.pixel_values_videos is not None
        )):
            raise ValueError(
                f"the {self.name} tower only runs on inputs with images; pass VLMInputs with pixel_values "
                "(model.prepare(images=..., text=...))"
            )
        return inputs

    def inputs(self, inputs: VLMInputs) -> TowerInputs | VLMInputs:
        """Inputs whose ``shape`` is this tower's [batch, pos] (what TL's patching functions iterate over)."""
        if not self.prefix:
            return inputs
        shapes = []

        def record(x, hook):
            shapes.append(x.shape[:2])

        with torch.no_grad():
            self.model.run_with_hooks(self._unwrap(inputs), fwd_hooks=[(self.full_name("hook_embed"), record)])
        return TowerInputs(inputs, torch.Size(shapes[0]))

    # ---------------------------------------------------------------- running

    def __call__(self, input: Any, **kwargs) -> torch.Tensor:
        return self.model(self._unwrap(input), **kwargs)

    def _full_hooks(self, hooks) -> list:
        return [(full, fn) for name, fn in hooks for full in self._names(name)]

    def hooks(self, fwd_hooks=(), bwd_hooks=(), **kwargs):
        """TL's ``hooks`` context manager with tower-relative names."""
        return self.model.hooks(self._full_hooks(fwd_hooks), self._full_hooks(bwd_hooks), **kwargs)

    def run_with_hooks(self, input: Any, *args, fwd_hooks=(), bwd_hooks=(), **kwargs):
        return self.model.run_with_hooks(
            self._unwrap(input), *args, fwd_hooks=self._full_hooks(fwd_hooks), bwd_hooks=self._full_hooks(bwd_hooks), **kwargs
        )

    def run_with_cache(self, input: Any, *args, names_filter=None, **kwargs) -> tuple[Any, ActivationCache]:
        """Run the whole VLM; the cache holds this tower's activations under tower-relative names."""
        if names_filter is None:
            wanted = set(self._names(lambda name: True))
        elif isinstance(names_filter, str):
            wanted = {self.full_name(names_filter)}
        elif callable(names_filter):
            wanted = set(self._names(names_filter))
        else:
            wanted = {self.full_name(n) for n in names_filter}
        if not self.cfg.use_attn_result and names_filter is None:
            wanted = {n for n in wanted if not n.endswith("hook_result")}
        out, cache = self.model.run_with_cache(self._unwrap(input), *args, names_filter=lambda n: n in wanted, **kwargs)
        relative = {}
        for full, tensor in cache.cache_dict.items():
            rel = self.relative_name(full)
            if rel is not None:
                relative[rel] = tensor
        if self.prefix and self.full_name("hook_embed") in cache.cache_dict:
            relative["hook_embed"] = cache.cache_dict[self.full_name("hook_embed")]
        return out, VLMActivationCache(relative, self, has_batch_dim=cache.has_batch_dim)
