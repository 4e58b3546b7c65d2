"""The softmax family's torch wiring (SPECS.md §2): autograd over hla::softmax_attention_forward /
backward, the KV-cache call, and FlashAttention-named entry points.

Layout [B, T, H, D] (FlashAttention's). libhla's extras are keyword arguments: `g` (the Forgetting
Transformer's log-forget bias [B, T, HQ]) and `gate` (sigmoid output-gate logits [B, T, HQ, D]).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ._linear import BACKEND, get_backend, inner_contiguous, on_current_stream

Tensor = torch.Tensor


def _window(op: str, causal: bool, window_size) -> int:
    """FlashAttention's (left, right) window → libhla's w (query i sees keys i − w < j ≤ i)."""
    left, right = window_size
    if left < 0 and right < 0:
        return 0
    if not causal or right not in (0, -1):
        raise ValueError(f"{op}: window_size: hla supports causal sliding windows (left, 0); got {tuple(window_size)} "
                         f"with causal={causal}")
    return int(left) + 1


class SoftmaxFunction(torch.autograd.Function):
    """Autograd over libhla's flash-style attention; saves the inputs, o and the log-sum-exp."""

    @staticmethod
    def forward(ctx, causal, window, scale, q, k, v, g, gate, cu_seqlens):
        backend = BACKEND[get_backend()]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        on_current_stream(q)
        _C.softmax_forward(causal, window, scale, backend, q, k, v, g, gate, cu_seqlens, o, lse)
        ctx.cfg = (causal, window, scale, backend)
        ctx.save_for_backward(q, k, v, g, gate, cu_seqlens, o, lse)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, d_o, _d_lse):
        q, k, v, g, gate, cu_seqlens, o, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:8]
        grads = []
        for x, need, fp32 in zip((q, k, v, g, gate), needs, (False, False, False, True, False)):
            grads.append(torch.empty(x.shape, dtype=torch.float32 if fp32 else x.dtype, device=x.device)
                         if need and x is not None else None)
        d_o = inner_contiguous(d_o)
        on_current_stream(q)
        _C.softmax_backward(*ctx.cfg, q, k, v, g, gate, cu_seqlens, o, lse, d_o, *grads)
        if grads[3] is not None:
            grads[3] = grads[3].to(g.dtype)
        return (None, None, None, *grads, None)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, window: int = 0,
                      scale: Optional[float] = None, g: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                      cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(o [B,T,HQ,D], lse [B,HQ,T] fp32): softmax attention with GQA, an optional causal sliding window
    of `window` tokens, forget-gate bias g and output gate; differentiable in q, k, v, g, gate."""
    q, k, v, g, gate = map(inner_contiguous, (q, k, v, g, gate))
    return SoftmaxFunction.apply(bool(causal), int(window), None if scale is None else float(scale), q, k, v, g,
                                 gate, cu_seqlens)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *, g: Optional[Tensor] = None,
                    gate: Optional[Tensor] = None):
    """FlashAttention's flash_attn_func on libhla: q [B,T,HQ,D], k/v [B,T,HKV,D] → o [B,T,HQ,D]
    (with return_attn_probs: (o, softmax_lse [B,HQ,T], None))."""
    _unsupported("flash_attn_func", dropout_p, softcap, alibi_slopes)
    o, lse = softmax_attention(q, k, v, causal, _window("flash_attn_func", causal, window_size), softmax_scale, g,
                               gate)
    return (o, lse, None) if return_attn_probs else o


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, *, g: Optional[Tensor] = None,
                           gate: Optional[Tensor] = None):
    """Packed sequences, FlashAttention's layout: q [total, HQ, D], k/v [total, HKV, D]; queries and
    keys of a sequence coincide (self-attention), so cu_seqlens_q must equal cu_seqlens_k."""
    op = "flash_attn_varlen_func"
    _unsupported(op, dropout_p, softcap, alibi_slopes)
    if block_table is not None:
        raise ValueError(f"{op}: block_table: paged keys are supported by flash_attn_with_kvcache only")
    if cu_seqlens_q is not cu_seqlens_k and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError(f"{op}: cu_seqlens_k: hla packs self-attention only (cu_seqlens_q == cu_seqlens_k)")
    o, lse = softmax_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal,
                               _window(op, causal, window_size), softmax_scale,
                               None if g is None else g.unsqueeze(0), None if gate is None else gate.unsqueeze(0),
                               cu_seqlens_q)
    o = o.squeeze(0)
    return (o, lse.squeeze(0), None) if return_attn_probs else o


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx: Optional[Tensor] = None, cache_leftpad=None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes=None, num_splits: int = 0,
                            return_softmax_lse: bool = False, *, g: Optional[Tensor] = None,
                            g_cache: Optional[Tensor] = None, gate: Optional[Tensor] = None):
    """FlashAttention's decode entry: k, v (new tokens) are written into k_cache / v_cache in place at
    cache_seqlens, then q attends over the cache. Inference only (no autograd)."""
    op = "flash_attn_with_kvcache"
    _unsupported(op, 0.0, softcap, alibi_slopes)
    if rotary_cos is not None or rotary_sin is not None or cache_leftpad is not None:
        raise ValueError(f"{op}: rotary_cos/rotary_sin/cache_leftpad: apply RoPE before the call; not supported")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    q, k, v, g, gate = map(inner_contiguous, (q, k, v, g, gate))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = (torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
           if return_softmax_lse else None)
    on_current_stream(q)
    _C.softmax_kvcache(bool(causal), _window(op, causal, window_size),
                       None if softmax_scale is None else float(softmax_scale), BACKEND[get_backend()], q, k_cache,
                       v_cache, cache_seqlens, k, v, cache_batch_idx, block_table, g_cache, g, gate, o, lse)
    return (o, lse) if return_softmax_lse else o


def _unsupported(op: str, dropout_p: float, softcap: float, alibi_slopes) -> None:
    if dropout_p:
        raise ValueError(f"{op}: dropout_p: attention dropout is not supported by hla (got {dropout_p})")
    if softcap:
        raise ValueError(f"{op}: softcap: logit soft-capping is not supported by hla (got {softcap})")
    if alibi_slopes is not None:
        raise ValueError(f"{op}: alibi_slopes: not supported by hla")
