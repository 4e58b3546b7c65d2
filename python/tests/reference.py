"""An independent pure-torch implementation of the linear family (SPECS.md §1), written for the tests:
the per-token recurrence, differentiable by torch autograd, run in whatever dtype its inputs have
(fp64 for the oracle, fp32 for "the reference run in fp32" of the tolerance policy).

Nothing here calls hla. Slow on purpose (a Python loop over tokens): it is only run on tiny sizes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """MiniMax's per-head decay as the Hugging Face `minimax` model builds it: slopes of ALiBi form
    (2^(-8/H))^(h+1), scaled down linearly with depth."""
    base = 1.0 / (2.0 ** (8.0 / num_heads))
    factor = 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return torch.tensor([-(base ** (h + 1)) * factor for h in range(num_heads)], dtype=torch.float64)


def _gate(x, kind, A_log, lower_bound):
    if kind == "none":
        return x
    if kind == "softplus_decay":
        return -torch.exp(A_log) * F.softplus(x)
    if kind == "bounded_sigmoid":
        return lower_bound * torch.sigmoid(torch.exp(A_log) * x)
    raise ValueError(kind)


def _beta(b, kind):
    if kind == "none":
        return b
    if kind == "sigmoid":
        return torch.sigmoid(b)
    if kind == "sigmoid2x":
        return 2 * torch.sigmoid(b)
    raise ValueError(kind)


def recurrence(q, k, v, *, decay: str = "none", update: str = "additive", g=None, beta=None,
               scale: Optional[float] = None, initial_state=None, cu_seqlens=None, qk_l2norm: bool = False,
               gate: str = "none", A_log=None, dt_bias=None, lower_bound: float = -5.0,
               beta_activation: str = "none", output_final_state: bool = True):
    """o [B,T,HV,V] and final state [N,HV,K,V] of the recurrence

        S ← D_t S;  delta: S ← S + k_t (β_t (v_t − Sᵀ k_t))ᵀ,  additive: S ← S + k_t v_tᵀ;  o_t = Sᵀ (s q_t)

    in the dtype of q. g: [HV] (fixed), [B,T,HV] (scalar) or [B,T,HV,K] (vector), log decay or the raw
    gate input; dt_bias [HV] or [HV, K]."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    dt = q.dtype
    s = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        seqs = [(0, cu[n], cu[n + 1] - cu[n]) for n in range(len(cu) - 1)]
    rows = {}
    finals = []
    for n, (b, start, length) in enumerate(seqs):
        S = (initial_state[n].to(dt) if initial_state is not None
             else torch.zeros(HV, K, V, dtype=dt, device=q.device))
        for t in range(start, start + length):
            qt = q[b, t].repeat_interleave(G, dim=0)  # [HV, K]: value head hv reads q/k head hv // G
            kt = k[b, t].repeat_interleave(G, dim=0)
            vt = v[b, t]  # [HV, V]
            if qk_l2norm:
                qt = qt / torch.sqrt((qt * qt).sum(-1, keepdim=True) + 1e-6)
                kt = kt / torch.sqrt((kt * kt).sum(-1, keepdim=True) + 1e-6)
            if decay == "fixed":
                S = S * torch.exp(g.to(dt))[:, None, None]
            elif decay == "scalar":
                x = g[b, t] + (dt_bias if gate != "none" else 0)
                S = S * torch.exp(_gate(x, gate, A_log, lower_bound))[:, None, None]
            elif decay == "vector":
                x = g[b, t] + (dt_bias if gate != "none" else 0)
                a = A_log[:, None] if A_log is not None else None
                S = S * torch.exp(_gate(x, gate, a, lower_bound))[:, :, None]
            if update == "delta":
                bt = _beta(beta[b, t], beta_activation)  # [HV]
                u = bt[:, None] * (vt - torch.einsum("hkv,hk->hv", S, kt))
                S = S + kt[:, :, None] * u[:, None, :]
            else:
                S = S + kt[:, :, None] * vt[:, None, :]
            rows[(b, t)] = torch.einsum("hkv,hk->hv", S, s * qt)
        finals.append(S)
    zero = torch.zeros(HV, V, dtype=dt, device=q.device)
    o = torch.stack([torch.stack([rows.get((b, t), zero) for t in range(T)]) for b in range(B)])
    final = torch.stack(finals) if finals else None
    return o, (final if output_final_state else None)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (absolute when ref is zero), in fp64; NaN/Inf give inf."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        return math.inf
    num = torch.linalg.vector_norm(x - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return num / den if den > 0 else num
