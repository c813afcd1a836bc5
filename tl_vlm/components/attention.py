"""Multi-head / grouped-query self-attention with TL's per-head hooks.

SDPA runs whenever nothing hooks ``hook_attn_scores`` or ``hook_pattern`` of this layer; the
explicit softmax(QK^T) path runs only where a hook or cache asks for the pattern.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_vlm.components import param_layout as layout
from tl_vlm.components.hooks import active, editing, run_hook
from tl_vlm.components.kv_cache import KVCacheEntry
from tl_vlm.components.norms import RMSNorm
from tl_vlm.components.reused_storage import ReusedStorage
from tl_vlm.components.rotary import apply_rotary
from tl_vlm.components.segments import Segments
from tl_vlm.config import TowerConfig


# Boolean (True = may attend), an additive float bias (T5's relative positions), or Segments (attention restricted
# to images / frames / windows, run as HF runs it); None: no mask beyond ``causal``.
AttentionMask = Bool[Tensor, "batch 1 q k"] | Float[Tensor, "batch head q k"] | Segments | None


class Attention(nn.Module):
    def __init__(self, cfg: TowerConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, d, dh = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(layout.empty_heads_in(h, d, dh))
        self._W_K = nn.Parameter(layout.empty_heads_in(kv, d, dh))
        self._W_V = nn.Parameter(layout.empty_heads_in(kv, d, dh))
        self.W_O = nn.Parameter(layout.empty_heads_out(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh)) if cfg.attn_bias else None
        self._b_K = nn.Parameter(torch.zeros(kv, dh)) if cfg.attn_bias else None
        self._b_V = nn.Parameter(torch.zeros(kv, dh)) if cfg.attn_bias else None
        self.b_O = nn.Parameter(torch.zeros(d)) if cfg.attn_out_bias else None
        self.knockout: Bool[Tensor, "batch 1 q k"] | None = None  # set by analysis.knockout.attention_knockout
        scale = dh**-0.5 if cfg.use_attn_scale else 1.0  # T5 folds the scale into its weights
        if cfg.attn_scale > 0:  # Gemma 2 / 3: query_pre_attn_scalar**-0.5
            scale = 1.0 / cfg.attn_scale
        # OPT scales the projected queries and attends unscaled: in half precision the rounded queries differ.
        self.q_scale, self.scale = (scale, 1.0) if cfg.scale_queries else (1.0, scale)
        self.repeat = h // kv
        # As TL's use_qk_norm: hook_q / hook_k hold the projections, q_norm / k_norm (with their own hooks) follow.
        self.q_norm = RMSNorm(dh, cfg.eps) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.eps) if cfg.use_qk_norm else None
        self.reused = ReusedStorage()  # memory of the explicit path's scores / pattern, kept from run to run

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]

    # GQA keeps one K/V per group; the public names repeat them per query head as TL does.
    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._W_K.repeat_interleave(self.repeat, 0) if self.repeat > 1 else self._W_K

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._W_V.repeat_interleave(self.repeat, 0) if self.repeat > 1 else self._W_V

    @property
    def b_K(self) -> Float[Tensor, "head d_head"] | None:
        if self._b_K is None or self.repeat == 1:
            return self._b_K
        return self._b_K.repeat_interleave(self.repeat, 0)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"] | None:
        if self._b_V is None or self.repeat == 1:
            return self._b_V
        return self._b_V.repeat_interleave(self.repeat, 0)

    def _project(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        if x.ndim == 4:  # per-head inputs [batch, pos, head, d_model] (TL's use_split_qkv_input)
            out = torch.einsum("bphm,hmd->bphd", x, W)
            return out if b is None else out + b
        out = F.linear(x, layout.heads_in_linear(W), None if b is None else b.reshape(-1))
        return out.view(*x.shape[:-1], W.shape[0], W.shape[-1])

    def split_inputs(self, on: bool) -> None:
        """TL's use_split_qkv_input: the block feeds each head its own copy of the residual stream through
        ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` ([batch, pos, head, d_model], before ``ln1``). The
        hook points exist only while on, so every registered hook point fires."""
        for name in ("hook_q_input", "hook_k_input", "hook_v_input"):
            if on and name not in self._modules:
                self.add_module(name, HookPoint())
            elif not on and name in self._modules:
                del self._modules[name]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask = None,
        causal: bool = False,
        cache: KVCacheEntry | None = None,
        key_input: Float[Tensor, "batch pos kv_head d_model"] | None = None,
        value_input: Float[Tensor, "batch pos kv_head d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``x`` feeds Q, K and V, unless per-head ``key_input`` / ``value_input`` are given (``x`` is then the
        per-head query input)."""
        q = run_hook(self.hook_q, self._project(x, self.W_Q, self.b_Q))
        if self.q_scale != 1.0:
            q = q * self.q_scale
        k = run_hook(self.hook_k, self._project(x if key_input is None else key_input, self._W_K, self._b_K))
        v = run_hook(self.hook_v, self._project(x if value_input is None else value_input, self._W_V, self._b_V))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q = run_hook(self.hook_rot_q, apply_rotary(q, *rotary))
            k = run_hook(self.hook_rot_k, apply_rotary(k, *rotary))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        return self._output(self._attend(q, k, v, mask, causal))

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, causal: bool
    ) -> Float[Tensor, "batch pos head d_head"]:
        """softmax(QK^T)V per head, hooked z; ``mask`` is boolean (True = may attend), an additive float bias, or
        ``Segments`` (SDPA per segment unless the pattern is asked for or knocked out)."""
        if self.cfg.attn_scores_soft_cap > 0:  # no fused kernel caps scores: HF runs eager attention too
            mask = mask.mask if isinstance(mask, Segments) else mask
            if self.knockout is not None:
                mask, causal = self._knocked_out(mask, causal, q.shape[2], k.shape[2], q)
            return run_hook(self.hook_z, self._soft_capped(q, k, v, mask, causal).transpose(1, 2))
        observed = active(self.hook_attn_scores) or active(self.hook_pattern)
        # An fp32 model: the explicit path is within 1e-6 of SDPA and serves both. Half precision (a float32 tower
        # of a half-precision model too, whose output is rounded): a pattern that is only cached is computed beside
        # SDPA, whose z (HF's, bit for bit) flows on; an editing hook makes it explicit.
        fp32 = q.dtype == self.cfg.dtype == torch.float32
        explicit = editing(self.hook_attn_scores) or editing(self.hook_pattern) or (observed and fp32)
        if isinstance(mask, Segments):
            if self.knockout is None and not explicit:
                if observed:
                    self._explicit(q, k, v, mask.mask, causal, for_cache=True)
                return run_hook(self.hook_z, mask.attend(q, k, v, self.scale).transpose(1, 2))
            mask = mask.mask
        if self.knockout is not None:
            mask, causal = self._knocked_out(mask, causal, q.shape[2], k.shape[2], q)
        if explicit:
            z = self._explicit(q, k, v, mask, causal)
        else:
            if observed:
                self._explicit(q, k, v, mask, causal, for_cache=True)
            if self.repeat > 1 and mask is not None:
                # As HF: SDPA's enable_gqa with a mask falls back to the slow math kernel on CUDA.
                k, v = k.repeat_interleave(self.repeat, 1), v.repeat_interleave(self.repeat, 1)
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.scale,
                enable_gqa=self.repeat > 1 and mask is None,
            )
        return run_hook(self.hook_z, z.transpose(1, 2))

    def _knocked_out(self, mask: Tensor | None, causal: bool, q_len: int, k_len: int, like: Tensor) -> tuple[Tensor, bool]:
        """The mask with ``self.knockout`` (True = blocked, [batch|1, 1, q, k] over the whole sequence) applied;
        still a mask, so SDPA stays usable."""
        blocked = self.knockout[..., k_len - q_len : k_len, :k_len].to(like.device)
        if mask is not None and mask.dtype != torch.bool:
            return mask.masked_fill(blocked, torch.finfo(like.dtype).min), False
        if mask is None:
            mask = ~causal_block(q_len, k_len, like.device) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=like.device)
        return mask & ~blocked, False

    def _output(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        if active(self.hook_result) or self.cfg.use_attn_result:
            result = run_hook(self.hook_result, torch.einsum("bphd,hdm->bphm", z, self.W_O))
            if editing(self.hook_result) or z.dtype == self.cfg.dtype == torch.float32:  # fp32: the sum is within 1e-6 of F.linear
                out = result.sum(2)
                return out if self.b_O is None else out + self.b_O
        return F.linear(z.reshape(*z.shape[:2], -1), layout.heads_out_linear(self.W_O), self.b_O)

    def _explicit(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, for_cache: bool = False
    ) -> Tensor | None:
        """Scores, pattern (hooked) and z; ``for_cache``: scores and pattern only, z comes from SDPA."""
        dtype = q.dtype
        if dtype in (torch.float16, torch.bfloat16):
            # SDPA accumulates half-precision attention in float32 and rounds z once; so does this path (scores
            # and patterns are float32), which keeps it within rounding of the SDPA path HF runs.
            q, k, v = q.float(), k.float(), v.float()
            mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
        if self.repeat > 1:
            k, v = k.repeat_interleave(self.repeat, 1), v.repeat_interleave(self.repeat, 1)
        # Written into memory reused from run to run where nothing still holds it (reused_storage.py): the same
        # kernels, the same numbers, without faulting in fresh pages for the largest cached activations every run.
        same_heads = q.shape[:-2] == k.shape[:-2]  # (else matmul broadcasts, and resizes whatever it writes into)
        reused = self.reused.empty("scores", (*q.shape[:-1], k.shape[-2]), q, k) if same_heads else None
        scores = torch.matmul(q, k.transpose(-1, -2), **({} if reused is None else {"out": reused}))
        # In place on the fresh scores: with every activation cached, each extra [head, q, k] temporary costs. The
        # dtype's minimum (filled, or added to scores far smaller) cannot overflow to -inf in fp16.
        bias = causal_bias(q.shape[2], k.shape[2], q.device, q.dtype) if mask is None and causal else mask
        additive = bias is not None and bias.dtype != torch.bool
        if additive and not (torch.is_grad_enabled() and (scores.requires_grad or bias.requires_grad)):
            torch.add(bias, scores, alpha=self.scale, out=scores)  # scale and mask in one pass (out= records no grad)
        else:
            if self.scale != 1.0:
                scores.mul_(self.scale)
            if additive:
                scores += bias
            elif bias is not None:
                scores.masked_fill_(~bias, torch.finfo(q.dtype).min)
        scores = run_hook(self.hook_attn_scores, scores)
        reused = self.reused.empty("pattern", scores.shape, scores) if scores.dtype == torch.float32 else None
        if reused is not None:  # float32 scores: F.softmax's kernel, into the reused memory
            pattern = torch.ops.aten._softmax.out(scores, -1, False, out=reused)
        elif scores.dtype == q.dtype:
            pattern = scores.softmax(-1)
        else:  # a hook returned scores of another dtype
            pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if mask is not None and mask.dtype == torch.bool:
            # A query that may see nothing (left padding) attends nowhere, as in SDPA, not uniformly.
            pattern = pattern * mask.any(-1, keepdim=True) if reused is None else pattern.mul_(mask.any(-1, keepdim=True))
        pattern = run_hook(self.hook_pattern, pattern)
        if for_cache:
            return None
        z = torch.matmul(pattern, v)
        return z if z.dtype == dtype else z.to(dtype)

    def _soft_capped(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """HF's eager attention with Gemma 2's tanh cap on the scores, op for op in the model dtype (so half precision
        is HF's bit for bit): scale, cap, additive mask of the dtype's minimum, float32 softmax, rounded pattern."""
        if self.repeat > 1:
            k, v = k.repeat_interleave(self.repeat, 1), v.repeat_interleave(self.repeat, 1)
        cap = self.cfg.attn_scores_soft_cap
        scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * self.scale / cap) * cap
        if mask is None and causal:
            mask = ~causal_block(q.shape[2], k.shape[2], q.device)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores + torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        elif mask is not None:
            scores = scores + mask
        scores = run_hook(self.hook_attn_scores, scores)
        pattern = run_hook(self.hook_pattern, F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)


@functools.lru_cache(maxsize=4)
def causal_bias(q_len: int, k_len: int, device: torch.device, dtype: torch.dtype) -> Float[Tensor, "q k"]:
    """``causal_block`` as an additive mask of the dtype's minimum (read only: it is shared)."""
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(
        causal_block(q_len, k_len, device), torch.finfo(dtype).min
    )


@functools.lru_cache(maxsize=4)
def causal_block(q_len: int, k_len: int, device: torch.device) -> Bool[Tensor, "q k"]:
    """Positions a query may not see; the query block sits at the end of the key sequence."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(k_len - q_len + 1)
