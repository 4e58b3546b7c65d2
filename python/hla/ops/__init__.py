"""flash-linear-attention-compatible ops backed by libhla (SPECS.md §3), and the softmax family
under FlashAttention's names (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache).

`from hla.ops import chunk_gated_delta_rule` replaces `from fla.ops.gated_delta_rule import ...`:
same names, argument names, defaults, shapes ([B, T, H, D], states [N, HV, K, V] fp32) and return
values (o, final_state or None). Every chunk_* op is differentiable in all its tensor inputs (the
backward is libhla's, recomputing from the inputs); fused_recurrent_* are the decode / small-T forms
(libhla's decode step when there is no cu_seqlens), differentiable through the chunked path when a
gradient is needed.

Differences from fla, on purpose:
- chunk_lightning_attn uses the per-head decay of the Hugging Face MiniMax model (what
  MiniMax-Text-01 / M1 checkpoints were trained with), computed by hla::lightning_attn_log_decay,
  not fla's RetNet-style formula.
- state_v_first=True (a transposed state layout) and reverse=True are not supported: ValueError.
- Inputs are fp32, bf16 or fp16 (libhla's input dtypes); the state is fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _C
from ._linear import (Config, decode, get_backend, inner_contiguous, linear, make_config,  # noqa: F401
                      use_backend)
from ._softmax import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,  # noqa: F401
                       softmax_attention)

Tensor = torch.Tensor

__all__ = [
    "chunk_linear_attn", "chunk_lightning_attn", "chunk_simple_gla", "chunk_gla", "chunk_delta_rule",
    "chunk_gated_delta_rule", "chunk_kda", "fused_recurrent_linear_attn", "fused_recurrent_lightning_attn",
    "fused_recurrent_simple_gla", "fused_recurrent_gla", "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule", "fused_recurrent_kda", "lightning_attn_log_decay", "use_backend",
    "get_backend", "decode", "make_config", "softmax_attention", "flash_attn_func", "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]

# fla options that only tune its Triton kernels: accepted and ignored so fla call sites work as is.
_IGNORED_KWARGS = {"chunk_size", "cu_seqlens_cpu", "chunk_indices", "disable_recompute", "safe_gate",
                   "num_accepted_tokens"}


def _check_kwargs(op: str, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS:
            continue
        if name in ("state_v_first", "transpose_state_layout", "reverse") and not value:
            continue
        if name in ("state_v_first", "transpose_state_layout"):
            raise ValueError(f"{op}: {name}: hla keeps the state as [N, HV, K, V] (key-major); "
                             "the transposed layout is not supported")
        if name == "reverse":
            raise ValueError(f"{op}: reverse: reverse-time recurrences are not supported by hla")
        if name == "head_first":
            raise ValueError(f"{op}: head_first: removed in fla 0.5; inputs are [B, T, H, D]")
        raise TypeError(f"{op}() got an unexpected keyword argument {name!r}")


def _check_varlen(op: str, q: Tensor, initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> None:
    # fla checks these two in Python with these words; libhla checks them again (and everything else).
    if cu_seqlens is None:
        return
    if q.shape[0] != 1:
        raise ValueError(f"{op}: cu_seqlens: the batch size is expected to be 1 rather than {q.shape[0]} when "
                         "using cu_seqlens; flatten variable-length inputs before processing")
    if initial_state is not None and initial_state.shape[0] != cu_seqlens.shape[0] - 1:
        raise ValueError(f"{op}: initial_state: expected one state per sequence, "
                         f"{cu_seqlens.shape[0] - 1} rather than {initial_state.shape[0]}")


def _beta_activation(use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, op: str) -> str:
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(f"{op}: allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    if not use_beta_sigmoid_in_kernel:
        return "none"
    return "sigmoid2x" if allow_neg_eigval else "sigmoid"


def _gate_params(op: str, decay: str, v: Tensor, k: Tensor, A_log: Optional[Tensor], dt_bias: Optional[Tensor],
                 lower_bound: Optional[float]):
    """A_log [HV] and dt_bias ([HV] scalar decay, [HV, K] vector decay; fla passes KDA's flat [HV*K])
    as libhla wants them, fp32. A missing one is the identity of its formula (A_log = 0, dt_bias = 0)."""
    HV, K = v.shape[2], k.shape[3]
    if A_log is None:
        if lower_bound is None:
            raise ValueError(f"{op}: A_log: required when use_gate_in_kernel=True (and no lower_bound is set)")
        A_log = torch.zeros(HV, dtype=torch.float32, device=v.device)
    if dt_bias is None:
        dt_bias = torch.zeros((HV,) if decay == "scalar" else (HV, K), dtype=torch.float32, device=v.device)
    elif decay == "vector" and dt_bias.dim() == 1 and dt_bias.shape[0] == HV * K:
        dt_bias = dt_bias.view(HV, K)
    # libhla takes the gate parameters in fp32 (as HF keeps them); a model cast to bf16 still works
    return A_log.float(), dt_bias.float()


def _run(op: str, cfg: Config, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens,
         recurrent: bool = False):
    _check_varlen(op, q, initial_state, cu_seqlens)
    if recurrent:
        return _recurrent(cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens)
    return linear(cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens)


def _recurrent(cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens):
    """fused_recurrent_*: libhla's decode step over a private copy of the initial state (fla returns
    a new final state and leaves initial_state alone). Packed sequences and training go through the
    chunked forward/backward, which computes the same recurrence."""
    inputs = (q, k, v, g, beta, A_log, dt_bias, initial_state)
    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if wants_grad or cu_seqlens is not None:
        return linear(cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens)
    B, HV, K, V = q.shape[0], v.shape[2], q.shape[3], v.shape[3]
    if initial_state is None:
        state = torch.zeros((B, HV, K, V), dtype=torch.float32, device=v.device)
    else:
        state = initial_state.to(dtype=torch.float32, copy=True, memory_format=torch.contiguous_format)
    o = decode(cfg, q, k, v, g, beta, A_log, dt_bias, state)
    return o, (state if output_final_state else None)


# ---- linear attention (no decay, additive) --------------------------------------------------------

def _linear_attn(op, q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, recurrent):
    if not normalize:
        return _run(op, make_config("none", "additive", scale), q, k, v, None, None, None, None, initial_state,
                    output_final_state, cu_seqlens, recurrent)
    # normalize=True (fla's default): o_t = (Σ_s k_s v_sᵀ)ᵀ s q_t / (s q_t · (z_0 + Σ_s k_s) + 1e-10).
    # The denominator is the same recurrence with a value column of ones, so one kernel call computes
    # both: v' = [v, 1], state' = [S, z]. Only the division happens here (as in fla).
    kv_init, z_init = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    ones = torch.ones(v.shape[:3] + (1,), dtype=v.dtype, device=v.device)
    v1 = torch.cat([v, ones], dim=-1)
    state1 = None
    if kv_init is not None or z_init is not None:
        N, H, K, V = _num_states(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3]
        kv = kv_init if kv_init is not None else torch.zeros((N, H, K, V), dtype=torch.float32, device=v.device)
        z = (z_init.reshape(N, H, K, 1).to(torch.float32) if z_init is not None
             else torch.zeros((N, H, K, 1), dtype=torch.float32, device=v.device))
        state1 = torch.cat([kv.to(torch.float32), z], dim=-1)
    o1, ht1 = _run(op, make_config("none", "additive", scale), q, k, v1, None, None, None, None, state1,
                   output_final_state, cu_seqlens, recurrent)
    o = o1[..., :-1] / (o1[..., -1:] + 1e-10)
    if not output_final_state:
        return o, None
    return o, (ht1[..., :-1], ht1[..., -1].unsqueeze(1))


def _num_states(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def chunk_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                      initial_state=None, output_final_state: bool = False, normalize: bool = True,
                      cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """Linear attention, S_t = S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ (scale q_t); normalize=True divides by
    scale q_t · Σ k (fla's default), with state (kv_state [N,H,K,V], z_state [N,1,H,K])."""
    _check_kwargs("chunk_linear_attn", kwargs)
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state, normalize,
                        cu_seqlens, False)


def fused_recurrent_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                                initial_state=None, output_final_state: bool = False, reverse: bool = False,
                                normalize: bool = False, cu_seqlens: Optional[Tensor] = None,
                                **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_linear_attn", dict(kwargs, reverse=reverse))
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, cu_seqlens, True)


# ---- Lightning attention (fixed per-head decay, additive) -----------------------------------------

_decay_cache: dict = {}


def lightning_attn_log_decay(num_heads: int, layer_idx: int, num_layers: int,
                             device: Optional[torch.device] = None) -> Tensor:
    """The MiniMax Lightning log decay γ_h [num_heads] fp32 of layer `layer_idx` of `num_layers`."""
    key = (int(num_heads), int(layer_idx), int(num_layers), str(device))
    if key not in _decay_cache:
        _decay_cache[key] = _C.lightning_attn_log_decay(*key[:3]).to(device or "cpu")
    return _decay_cache[key]


def _lightning(op, q, k, v, layer_idx, num_layers, scale, initial_state, output_final_state, cu_seqlens,
               recurrent):
    g_gamma = lightning_attn_log_decay(v.shape[2], layer_idx, num_layers, v.device)
    return _run(op, make_config("fixed", "additive", scale), q, k, v, g_gamma, None, None, None, initial_state,
                output_final_state, cu_seqlens, recurrent)


def chunk_lightning_attn(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, num_layers: int,
                         scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                         output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                         **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """MiniMax Lightning attention: fixed per-head decay from (layer_idx, num_layers), see
    lightning_attn_log_decay. Not differentiable in the decay (it is a constant of the layer)."""
    _check_kwargs("chunk_lightning_attn", kwargs)
    return _lightning("chunk_lightning_attn", q, k, v, layer_idx, num_layers, scale, initial_state,
                      output_final_state, cu_seqlens, False)


def fused_recurrent_lightning_attn(q: Tensor, k: Tensor, v: Tensor, layer_idx: int, num_layers: int,
                                   scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                                   output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                                   **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_lightning_attn", kwargs)
    return _lightning("fused_recurrent_lightning_attn", q, k, v, layer_idx, num_layers, scale, initial_state,
                      output_final_state, cu_seqlens, True)


# ---- simple GLA (scalar decay; or fixed g_gamma; additive) -----------------------------------------

def _simple_gla(op, q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, recurrent):
    if g is not None and g_gamma is not None:
        raise ValueError(f"{op}: g and g_gamma: pass one of them (per-token or per-head decay), not both")
    if g is not None:
        decay, gate = "scalar", g
    elif g_gamma is not None:
        decay, gate = "fixed", g_gamma.to(torch.float32)
    else:
        decay, gate = "none", None
    return _run(op, make_config(decay, "additive", scale), q, k, v, gate, None, None, None, initial_state,
                output_final_state, cu_seqlens, recurrent)


def chunk_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, g_gamma: Optional[Tensor] = None,
                     scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                     output_final_state: bool = False, state_v_first: bool = False,
                     cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """Simple GLA / Mamba2 SSD: S_t = exp(g_t) S_{t-1} + k_t v_tᵀ with g [B,T,HV] in log space, or a
    fixed per-head g_gamma [HV]."""
    _check_kwargs("chunk_simple_gla", dict(kwargs, state_v_first=state_v_first))
    return _simple_gla("chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                       cu_seqlens, False)


def fused_recurrent_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                               g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                               reverse: bool = False, state_v_first: bool = False,
                               cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_simple_gla", dict(kwargs, reverse=reverse, state_v_first=state_v_first))
    return _simple_gla("fused_recurrent_simple_gla", q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                       cu_seqlens, True)


# ---- GLA (vector decay, additive) --------------------------------------------------------------

def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
              **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """GLA: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ with g [B,T,HV,K] in log space."""
    _check_kwargs("chunk_gla", dict(kwargs, state_v_first=state_v_first))
    return _run("chunk_gla", make_config("vector", "additive", scale), q, k, v, g, None, None, None, initial_state,
                output_final_state, cu_seqlens)


def fused_recurrent_gla(q: Tensor, k: Tensor, v: Tensor, gk: Optional[Tensor] = None, gv: Optional[Tensor] = None,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, reverse: bool = False, state_v_first: bool = False,
                        cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_gla", dict(kwargs, reverse=reverse, state_v_first=state_v_first))
    if gv is not None:
        raise ValueError("fused_recurrent_gla: gv: value-channel decay is not supported by hla (key-channel gk only)")
    decay = "vector" if gk is not None else "none"
    return _run("fused_recurrent_gla", make_config(decay, "additive", scale), q, k, v, gk, None, None, None,
                initial_state, output_final_state, cu_seqlens, True)


# ---- DeltaNet (no decay, delta) ---------------------------------------------------------------

def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                     use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Optional[Tensor] = None,
                     **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """DeltaNet: S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ, β [B,T,HV]."""
    _check_kwargs("chunk_delta_rule", kwargs)
    return _run("chunk_delta_rule", make_config("none", "delta", scale, use_qk_l2norm_in_kernel), q, k, v, None,
                beta, None, None, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor] = None,
                               scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                               cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_delta_rule", kwargs)
    if beta is None:  # fla's default: β = 1
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    return _run("fused_recurrent_delta_rule", make_config("none", "delta", scale, use_qk_l2norm_in_kernel), q, k, v,
                None, beta, None, None, initial_state, output_final_state, cu_seqlens, True)


# ---- Gated DeltaNet (scalar decay, delta) ----------------------------------------------------------

def _gated_delta(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                 use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, cu_seqlens,
                 recurrent):
    gate = "none"
    if use_gate_in_kernel:
        gate = "softplus_decay"
        A_log, dt_bias = _gate_params(op, "scalar", v, k, A_log, dt_bias, None)
    else:
        A_log = dt_bias = None
    cfg = make_config("scalar", "delta", scale, use_qk_l2norm_in_kernel, gate, None,
                      _beta_activation(use_beta_sigmoid_in_kernel, allow_neg_eigval, op))
    return _run(op, cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens, recurrent)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: Optional[float] = None,
                           initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False, use_beta_sigmoid_in_kernel: bool = False,
                           allow_neg_eigval: bool = False, state_v_first: bool = False,
                           cu_seqlens: Optional[Tensor] = None, use_gate_in_kernel: bool = False,
                           A_log: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated DeltaNet: S_t = (I − β_t k_t k_tᵀ) exp(g_t) S_{t-1} + β_t k_t v_tᵀ, g [B,T,HV] in log
    space, or (use_gate_in_kernel) the raw input of g = −exp(A_log) softplus(g + dt_bias)."""
    _check_kwargs("chunk_gated_delta_rule", dict(kwargs, state_v_first=state_v_first))
    return _gated_delta("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                        use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                        allow_neg_eigval, cu_seqlens, False)


def fused_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                                     gk: Optional[Tensor] = None, gv: Optional[Tensor] = None,
                                     beta: Optional[Tensor] = None, scale: Optional[float] = None,
                                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                                     use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
                                     A_log: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                                     use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
                                     state_v_first: bool = False, cu_seqlens: Optional[Tensor] = None,
                                     **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    op = "fused_recurrent_gated_delta_rule"
    _check_kwargs(op, dict(kwargs, state_v_first=state_v_first))
    if gv is not None:
        raise ValueError(f"{op}: gv: value-channel decay is not supported by hla")
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=v.dtype, device=v.device)
    if gk is not None:
        if g is not None:
            raise ValueError(f"{op}: g and gk: pass one decay (per head or per key channel), not both")
        return _kda(op, q, k, v, gk, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                    use_gate_in_kernel, A_log, dt_bias, None, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                    cu_seqlens, True)
    if g is None:
        if use_gate_in_kernel:
            raise ValueError(f"{op}: g: required when use_gate_in_kernel=True")
        return _run(op, make_config("none", "delta", scale, use_qk_l2norm_in_kernel, "none", None,
                                    _beta_activation(use_beta_sigmoid_in_kernel, allow_neg_eigval, op)),
                    q, k, v, None, beta, None, None, initial_state, output_final_state, cu_seqlens, True)
    return _gated_delta(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                        use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                        cu_seqlens, True)


# ---- Kimi Delta Attention (vector decay, delta) -----------------------------------------------------

def _kda(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
         use_gate_in_kernel, A_log, dt_bias, lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval, cu_seqlens,
         recurrent):
    gate = "none"
    if use_gate_in_kernel:
        gate = "softplus_decay" if lower_bound is None else "bounded_sigmoid"
        A_log, dt_bias = _gate_params(op, "vector", v, k, A_log, dt_bias, lower_bound)
    else:
        A_log = dt_bias = None
    cfg = make_config("vector", "delta", scale, use_qk_l2norm_in_kernel, gate, lower_bound,
                      _beta_activation(use_beta_sigmoid_in_kernel, allow_neg_eigval, op))
    return _run(op, cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, output_final_state, cu_seqlens, recurrent)


def chunk_kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
              use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False, safe_gate: bool = False,
              lower_bound: Optional[float] = None, disable_recompute: bool = False,
              return_intermediate_states: bool = False, state_v_first: bool = False,
              cu_seqlens: Optional[Tensor] = None, A_log: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
              **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """Kimi Delta Attention: S_t = (I − β_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + β_t k_t v_tᵀ, g
    [B,T,HV,K]. use_gate_in_kernel: g is the raw input of −exp(A_log) softplus(g + dt_bias), or with
    lower_bound of lower_bound · sigmoid(exp(A_log) (g + dt_bias)); A_log [HV], dt_bias [HV*K] or [HV, K]."""
    # safe_gate and disable_recompute tune fla's kernels; lower_bound alone selects the bounded gate
    _check_kwargs("chunk_kda", dict(kwargs, state_v_first=state_v_first))
    if return_intermediate_states:
        raise ValueError("chunk_kda: return_intermediate_states: per-chunk states are internal to hla's kernels")
    return _kda("chunk_kda", q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                use_gate_in_kernel, A_log, dt_bias, lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                cu_seqlens, False)


def fused_recurrent_kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, A_log: Optional[Tensor] = None,
                        dt_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                        use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
                        use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
                        lower_bound: Optional[float] = None, state_v_first: bool = False,
                        cu_seqlens: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    _check_kwargs("fused_recurrent_kda", dict(kwargs, state_v_first=state_v_first))
    return _kda("fused_recurrent_kda", q, k, v, g, beta, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, lower_bound, use_beta_sigmoid_in_kernel,
                allow_neg_eigval, cu_seqlens, True)
