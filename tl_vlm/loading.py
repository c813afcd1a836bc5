"""One entry point for whatever a checkpoint is: a generative VLM (``HookedVLM``) or a dual encoder
(``HookedCLIP``), chosen by the checkpoint's config (``model_type``), for the store and the CLI."""

from __future__ import annotations

import os

from transformers import AutoConfig

from tl_vlm.checkpoints import resolve_checkpoint

DUAL_ENCODERS = ("clip", "siglip", "siglip2")


def load_model(name: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
    """``HookedCLIP.from_pretrained`` for CLIP / SigLIP / SigLIP 2 checkpoints, else ``HookedVLM.from_pretrained``; ``kwargs``
    go to either (a dual encoder has no unembedding: ``center_unembed=True`` is refused)."""
    from tl_vlm import HookedCLIP, HookedVLM

    path = resolve_checkpoint(name, revision)
    if AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type in DUAL_ENCODERS:
        if kwargs.pop("center_unembed", False):
            raise ValueError("center_unembed: a dual encoder has no unembedding")
        model = HookedCLIP.from_pretrained(path, **kwargs)
    else:
        model = HookedVLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    model.name_or_path = str(name)
    return model
