"""SAELens' SAE methods on a HookedVLM: ``add_sae`` / ``run_with_saes`` / ``run_with_cache_with_saes`` /
``reset_saes`` take SAELens SAE objects at any hook of any tower (``vision.blocks.2.hook_resid_post`` as well as
``blocks.1.hook_resid_post``).

SAELens' ``HookedSAETransformer`` does the work, unchanged: it swaps the HookPoint for a module that runs the SAE
(with the error term when asked), which tl_vlm calls like any module put in a hook slot (components/hooks.py), and
caches the SAE's own hook points (``...hook_resid_post.hook_sae_acts_post``). sae-lens is imported when first used:
it needs transformer-lens 3.x (``pip install sae-lens`` resolves to it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def _sae_transformer():
    try:
        from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer
    except ImportError as err:
        raise ImportError("SAE methods need sae-lens (pip install sae-lens; it runs with transformer-lens 3.9)") from err
    return HookedSAETransformer


class SAEMethods:
    """HookedSAETransformer's SAE surface; the methods it calls on itself are delegated too."""

    def _sae_state(self) -> None:
        if "_acts_to_saes" not in self.__dict__:
            self._acts_to_saes, self._transcoder_output_hooks = {}, {}

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        self._sae_state()
        return _sae_transformer().acts_to_saes.fget(self)

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False) -> None:
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` until ``reset_saes``; ``use_error_term=True`` adds the
        reconstruction error back, so outputs are unchanged while the SAE's activations are cached."""
        if exclude_special_tokens:
            raise NotImplementedError("exclude_special_tokens is not supported on HookedVLM; mask positions in a hook")
        self._sae_state()
        name = sae.cfg.metadata.hook_name
        if name not in self.hook_dict and name not in self._acts_to_saes:
            raise KeyError(f"no hook {name!r} for this SAE; model.hook_dict lists every hook of every tower")
        _sae_transformer().add_sae(self, sae, use_error_term=use_error_term)
        self._acts_to_saes[name].register_forward_pre_hook(_check_width(name, sae.cfg.d_in))

    def _reset_sae(self, act_name: str, prev_wrapper=None) -> None:
        _sae_transformer()._reset_sae(self, act_name, prev_wrapper)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        self._sae_state()
        _sae_transformer().reset_saes(self, act_names)

    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None):
        self._sae_state()
        return _sae_transformer().saes(self, saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term)

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
                      **model_kwargs):
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs):
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_cache(*model_args, **kwargs)


def _check_width(name: str, d_in: int):
    """A pre-hook refusing activations the SAE was not trained on (hook_z SAEs read all heads concatenated)."""

    def check(module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        width = x.shape[-1] * x.shape[-2] if name.endswith("hook_z") else x.shape[-1]
        if width != d_in:
            raise ValueError(f"the SAE at {name} has d_in={d_in}, but {name} is {width} wide ({tuple(x.shape)})")

    return check
