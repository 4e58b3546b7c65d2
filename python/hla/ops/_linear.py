"""The linear family's torch wiring: one autograd function over hla::linear_forward / linear_backward,
and the in-place decode step over hla::linear_decode.

Every public op in hla.ops is a named cell of one configuration (decay x update, SPECS.md §1); this
module knows nothing about the cells. Outputs are allocated here (libhla takes caller-allocated
outputs); all arithmetic happens in libhla.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations of the
# op functions below as real types.
import contextlib
import os
from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import _C

Tensor = torch.Tensor

DECAY = dict(_C.DECAY)
UPDATE = dict(_C.UPDATE)
GATE_ACTIVATION = dict(_C.GATE_ACTIVATION)
BETA_ACTIVATION = dict(_C.BETA_ACTIVATION)
BACKEND = dict(_C.BACKEND)

_default_backend = "auto"


def get_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the linear ops inside the block on a named libhla backend: "auto" (by device), "cpu"
    (chunked), "reference" (the fp64 per-token oracle, CPU tensors) or "cuda"."""
    global _default_backend
    if name not in BACKEND:
        raise ValueError(f"hla: backend: expected one of {sorted(BACKEND)}, got {name!r}")
    previous, _default_backend = _default_backend, name
    try:
        yield
    finally:
        _default_backend = previous


class Config(NamedTuple):
    """hla::LinearConfig as plain values, in the order the binding takes them."""

    decay: int
    update: int
    scale: Optional[float]
    qk_l2norm: bool
    gate_activation: int
    lower_bound: float
    beta_activation: int
    backend: int


def make_config(decay: str, update: str, scale: Optional[float] = None, qk_l2norm: bool = False,
                gate_activation: str = "none", lower_bound: Optional[float] = None,
                beta_activation: str = "none") -> Config:
    return Config(DECAY[decay], UPDATE[update], None if scale is None else float(scale), bool(qk_l2norm),
                  GATE_ACTIVATION[gate_activation], -5.0 if lower_bound is None else float(lower_bound),
                  BETA_ACTIVATION[beta_activation], BACKEND[_default_backend])


def on_current_stream(x: Tensor) -> None:
    """Points libhla's CUDA stream (a per-thread setting, hla::set_cuda_stream) at torch's current
    stream on x's device, so that hla's kernels are ordered with the caller's torch work, follow
    `with torch.cuda.stream(s):` and are recorded by CUDA graph capture. CPU tensors: nothing to do."""
    if x.is_cuda:
        _C.set_cuda_stream(torch.cuda.current_stream(x.device).cuda_stream)


def inner_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    """libhla takes any outer strides (so q/k/v may be slices of a fused projection) but needs the
    innermost dimension contiguous; copy only when it is not."""
    if x is None or x.dim() == 0 or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _num_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ---- the functional core (shared by the autograd.Function and the torch.library op) -------------

def forward_impl(cfg: Config, output_final_state: bool, q, k, v, g, beta, A_log, dt_bias, initial_state,
                 cu_seqlens) -> Tuple[Tensor, Optional[Tensor]]:
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    final_state = None
    if output_final_state:
        final_state = torch.empty((_num_seqs(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3]),
                                  dtype=torch.float32, device=v.device)
    on_current_stream(q)
    _C.linear_forward(*cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, o, final_state)
    return o, final_state


# Order of the differentiable inputs, and of the gradients backward_impl returns.
GRAD_INPUTS = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")


def backward_impl(cfg: Config, needs, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, d_o,
                  d_final_state) -> Tuple[Optional[Tensor], ...]:
    """Gradients for the inputs flagged in `needs` (one bool per GRAD_INPUTS entry), each in the dtype
    of its input; libhla writes the gate/state gradients in fp32."""
    inputs = (q, k, v, g, beta, A_log, dt_bias, initial_state)
    native = {"q", "k", "v"}  # libhla writes these in any floating dtype; the rest in fp32
    out = []
    for name, x, need in zip(GRAD_INPUTS, inputs, needs):
        if not need or x is None:
            out.append(None)
        else:
            out.append(torch.empty(x.shape, dtype=x.dtype if name in native else torch.float32, device=x.device))
    if d_o is None:
        d_o = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    d_o = inner_contiguous(d_o)
    if d_o.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        d_o = d_o.to(v.dtype)
    if d_final_state is not None:
        d_final_state = inner_contiguous(d_final_state.to(torch.float32))
    on_current_stream(q)
    _C.linear_backward(*cfg, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, d_o, d_final_state,
                       *out)
    return tuple(None if d is None else d.to(x.dtype) for d, x in zip(out, inputs))


class LinearFunction(torch.autograd.Function):
    """Autograd over the whole linear family. Saves only the inputs: libhla's backward recomputes."""

    @staticmethod
    def forward(ctx, cfg, output_final_state, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens):
        o, final_state = forward_impl(cfg, output_final_state, q, k, v, g, beta, A_log, dt_bias, initial_state,
                                      cu_seqlens)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
        return o, final_state

    @staticmethod
    def backward(ctx, d_o, d_final_state):
        q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:10]
        grads = backward_impl(ctx.cfg, needs, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, d_o,
                              d_final_state)
        return (None, None, *grads, None)


def _library_ops():
    """torch >= 2.4: the same two calls as torch.library custom ops, so torch.compile keeps one graph
    around them instead of breaking it at an opaque autograd.Function. Returns the forward op, or None
    on older torch (1.13 on CI) or when HLA_TORCH_LIBRARY=0."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < (2, 4) or os.environ.get("HLA_TORCH_LIBRARY", "1") == "0":
        return None

    def cfg_of(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend):
        return Config(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend)

    # Optional outputs are not allowed in a custom op's schema: an absent final state travels as an
    # empty tensor and becomes None again in linear() below.
    @torch.library.custom_op("hla::linear_forward", mutates_args=())
    def linear_forward_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
                          A_log: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
                          cu_seqlens: Optional[Tensor], decay: int, update: int, scale: Optional[float],
                          qk_l2norm: bool, gate_activation: int, lower_bound: float, beta_activation: int,
                          backend: int, output_final_state: bool) -> Tuple[Tensor, Tensor]:
        cfg = cfg_of(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend)
        o, ht = forward_impl(cfg, output_final_state, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens)
        return o, ht if ht is not None else v.new_empty((0,), dtype=torch.float32)

    @linear_forward_op.register_fake
    def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, decay, update, scale, qk_l2norm,
          gate_activation, lower_bound, beta_activation, backend, output_final_state):
        o = torch.empty_like(v)
        shape = (_num_seqs(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3]) if output_final_state else (0,)
        return o, v.new_empty(shape, dtype=torch.float32)

    @torch.library.custom_op("hla::linear_backward", mutates_args=())
    def linear_backward_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
                           A_log: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
                           cu_seqlens: Optional[Tensor], d_o: Tensor, d_final_state: Optional[Tensor],
                           decay: int, update: int, scale: Optional[float], qk_l2norm: bool, gate_activation: int,
                           lower_bound: float, beta_activation: int, backend: int,
                           needs_mask: int) -> List[Tensor]:
        cfg = cfg_of(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend)
        needs = [bool(needs_mask >> i & 1) for i in range(len(GRAD_INPUTS))]
        grads = backward_impl(cfg, needs, q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, d_o,
                              d_final_state)
        return [d if d is not None else q.new_empty((0,)) for d in grads]

    @linear_backward_op.register_fake
    def _(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, d_o, d_final_state, decay, update, scale,
          qk_l2norm, gate_activation, lower_bound, beta_activation, backend, needs_mask):
        inputs = (q, k, v, g, beta, A_log, dt_bias, initial_state)
        return [torch.empty_like(x) if (needs_mask >> i & 1) and x is not None else q.new_empty((0,))
                for i, x in enumerate(inputs)]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])
        ctx.cfg_args = inputs[9:17]
        ctx.mask = sum(1 << i for i in range(8) if inputs[i] is not None and inputs[i].requires_grad)

    def backward(ctx, d_o, d_final_state):
        saved = ctx.saved_tensors
        if d_final_state is not None and d_final_state.numel() == 0:
            d_final_state = None
        if d_o is None:
            d_o = torch.zeros_like(saved[2])
        grads = linear_backward_op(*saved, d_o, d_final_state, *ctx.cfg_args, ctx.mask)
        grads = [d if (ctx.mask >> i & 1) else None for i, d in enumerate(grads)]
        return (*grads, None) + (None,) * 9

    linear_forward_op.register_autograd(backward, setup_context=setup_context)
    return linear_forward_op


try:
    _LIBRARY_FORWARD = _library_ops()
except Exception as e:  # a torch whose custom-op API differs: keep the ops usable, say what is lost
    import warnings
    warnings.warn(f"hla: registering the linear ops with torch.library failed ({e!r}); using "
                  "torch.autograd.Function instead (torch.compile will break its graph at hla ops)")
    _LIBRARY_FORWARD = None


def linear(cfg: Config, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, beta: Optional[Tensor] = None,
           A_log: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
           output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(o, final_state or None) of one cell of the family, differentiable in every tensor input."""
    q, k, v, g, beta, A_log, dt_bias, initial_state = map(
        inner_contiguous, (q, k, v, g, beta, A_log, dt_bias, initial_state))
    if _LIBRARY_FORWARD is not None:
        o, ht = _LIBRARY_FORWARD(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens, *cfg,
                                 bool(output_final_state))
        return o, (ht if output_final_state else None)
    return LinearFunction.apply(cfg, bool(output_final_state), q, k, v, g, beta, A_log, dt_bias, initial_state,
                                cu_seqlens)


def decode(cfg: Config, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
           A_log: Optional[Tensor], dt_bias: Optional[Tensor], state: Tensor,
           state_indices: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """One (or a few) tokens per sequence against cached states, which are updated in place.

    q, k [N, T, H, K]; v [N, T, HV, V]; state [S, HV, K, V] fp32 (S >= N slots); sequence n uses slot
    state_indices[n] (default n; negative: skipped). Not differentiable: this is the inference path.
    """
    q, k, v, g, beta, A_log, dt_bias = map(inner_contiguous, (q, k, v, g, beta, A_log, dt_bias))
    if out is None:
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    on_current_stream(q)
    _C.linear_decode(*cfg, q, k, v, g, beta, A_log, dt_bias, state, state_indices, out)
    return out
