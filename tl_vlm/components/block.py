"""Pre-norm transformer block with TL's residual-stream hooks."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components.attention import Attention, AttentionMask
from tl_vlm.components.hooks import cached, run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.components.mlp import MLP
from tl_vlm.components.norms import make_norm
from tl_vlm.components.reused_storage import ReusedStorage
from tl_vlm.config import TowerConfig


class TransformerBlock(nn.Module):
    # TL's analysis tools read the stream through ln_final -> unembed only from blocks that say their
    # hook_resid_post is the whole residual stream (not a stack the model combines later).
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln1 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg.normalization_type, cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, cfg.gated_mlp, cfg.mlp_bias)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.reused = ReusedStorage()  # memory of the cached residual streams, kept from run to run

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
        resid_pre_hooked: bool = False,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``resid_pre_hooked``: the tower already ran ``hook_resid_pre`` (it keeps the hooked stream as a hidden
        state); the block is still called as a module, so PyTorch hooks on it fire."""
        if not resid_pre_hooked:
            resid = run_hook(self.hook_resid_pre, resid)
        if "hook_q_input" in self.attn._modules:
            q_in, k_in, v_in = self._split_inputs(resid)
            attn_out = self.attn(q_in, rotary, mask, causal, cache, key_input=k_in, value_input=v_in)
        else:
            attn_out = self.attn(self.ln1(resid), rotary, mask, causal, cache)
        attn_out = run_hook(self.hook_attn_out, self.attn_written(attn_out))
        resid = run_hook(self.hook_resid_mid, self._sum(resid, attn_out, self.hook_resid_mid, "mid"))
        mlp_in = run_hook(self.hook_mlp_in, resid.clone()) if "hook_mlp_in" in self._modules else resid
        mlp_out = run_hook(self.hook_mlp_out, self.mlp_written(self.mlp(self.ln2(mlp_in))))
        return run_hook(self.hook_resid_post, self._sum(resid, mlp_out, self.hook_resid_post, "post"))

    def _sum(self, resid: Tensor, out: Tensor, hook: HookPoint, slot: str) -> Float[Tensor, "batch pos d_model"]:
        """``resid + out``; a cached stream is written into reused memory (reused_storage.py), the same add."""
        same = cached(hook) and resid.shape == out.shape and resid.dtype == out.dtype
        into = self.reused.empty(slot, resid.shape, resid, out) if same else None
        return resid + out if into is None else torch.add(resid, out, out=into)

    def attn_written(self, attn_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """What the attention writes into the stream (``hook_attn_out``): its output; a gate or post-norm in
        ``GatedBlock`` / ``GemmaBlock``."""
        return attn_out

    def mlp_written(self, mlp_out: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """What the MLP writes into the stream (``hook_mlp_out``): its output here."""
        return mlp_out

    def _split_inputs(self, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head copies of the stream (TL's use_split_qkv_input), each normalised by ``ln1``; K and V get one copy
        per key/value head."""
        attn = self.attn
        heads = lambda n: resid.unsqueeze(2).repeat(1, 1, n, 1)  # noqa: E731
        q = run_hook(attn.hook_q_input, heads(attn.cfg.n_heads))
        k = run_hook(attn.hook_k_input, heads(attn.cfg.n_key_value_heads))
        v = run_hook(attn.hook_v_input, heads(attn.cfg.n_key_value_heads))
        return self.ln1(q), self.ln1(k), self.ln1(v)

    def mlp_input_hook(self, on: bool) -> None:
        """TL's use_hook_mlp_in: ``hook_mlp_in`` (a copy of ``hook_resid_mid`` the MLP reads) exists only while on."""
        if on and "hook_mlp_in" not in self._modules:
            self.add_module("hook_mlp_in", HookPoint())
        elif not on and "hook_mlp_in" in self._modules:
            del self._modules["hook_mlp_in"]
