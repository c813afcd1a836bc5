"""SAELens SAEs on a HookedVLM, at hooks of the vision and the language tower: splicing one in changes the run as
a hand-applied reconstruction does, the error term restores the run exactly, the SAE's own activations are cached,
and a width mismatch names both widths. Skipped when sae-lens (transformer-lens 3.9) is not installed."""

from __future__ import annotations

import pytest
import torch
from toy_batches import toy, toy_batch

sae_lens = pytest.importorskip("sae_lens")

HOOKS = ["vision.blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "hook_embed"]


def make_sae(hook: str, d_in: int, d_sae: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=sae_lens.saes.sae.SAEMetadata(hook_name=hook))
    sae = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    return sae.eval()


@pytest.fixture(scope="module")
def setup():
    model = toy()
    return model, toy_batch(model, 2)


def _width(model, hook: str) -> int:
    return model.vision.cfg.d_model if hook.startswith("vision.") else model.cfg.d_model


@pytest.mark.parametrize("hook", HOOKS)
def test_an_sae_splices_in_as_its_reconstruction(setup, hook):
    model, batch = setup
    sae = make_sae(hook, _width(model, hook))
    expected = model.run_with_hooks(batch, fwd_hooks=[(hook, lambda x, hook: sae.decode(sae.encode(x)))])
    logits = model.run_with_saes(batch, saes=[sae])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, model(batch), atol=1e-3)
    assert not model.acts_to_saes  # removed after the run


@pytest.mark.parametrize("hook", HOOKS)
def test_error_term_keeps_the_run_and_caches_the_sae(setup, hook):
    model, batch = setup
    sae = make_sae(hook, _width(model, hook))
    clean, clean_cache = model.run_with_cache(batch, names_filter=hook)
    logits, cache = model.run_with_cache_with_saes(batch, saes=[sae], use_error_term=True)
    assert torch.allclose(logits, clean, atol=1e-5)
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert torch.allclose(acts, sae.encode(clean_cache[hook]), atol=1e-5)


def test_add_and_reset(setup):
    model, batch = setup
    clean = model(batch)
    saes = [make_sae(h, _width(model, h), seed=i) for i, h in enumerate(HOOKS[:2])]
    for sae in saes:
        model.add_sae(sae)
    assert set(model.acts_to_saes) == set(HOOKS[:2])
    assert not torch.allclose(model(batch), clean, atol=1e-3)
    model.reset_saes()
    assert not model.acts_to_saes and torch.allclose(model(batch), clean, atol=1e-6)


def test_width_mismatch_names_both(setup):
    model, batch = setup
    hook = "vision.blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=rf"d_in=128, but {hook} is 64 wide"):
        model.run_with_saes(batch, saes=[make_sae(hook, 128)])
    assert not model.acts_to_saes
    with pytest.raises(KeyError, match="no hook"):
        model.add_sae(make_sae("vision.blocks.9.hook_resid_post", 64))
