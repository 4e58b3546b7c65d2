"""hla.ops' softmax family (flash_attn_* names) against an explicit fp64 torch attention written here:
GQA, causal and sliding window, forget-gate bias, output gate, packed sequences, gradients, and
KV-cache decode equal to the full forward."""
from __future__ import annotations

import math

import pytest
import torch

from hla import ops
from reference import rel_rms


def attention_ref(q, k, v, causal=True, window=0, scale=None, g=None, gate=None):
    """o [B,T,HQ,D] by the definition: softmax over visible keys of s·q·k + Σ_{j<s≤i} g_s, times
    sigmoid(gate). Runs in the inputs' dtype."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    s = D ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(HQ // HKV, dim=2)
    vv = v.repeat_interleave(HQ // HKV, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * s
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    visible = torch.ones(T, T, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window:
        visible &= j > i - window
    if g is not None:
        cg = torch.cumsum(g, dim=1).permute(0, 2, 1)  # [B, HQ, T]
        scores = scores + (cg[:, :, :, None] - cg[:, :, None, :])
    scores = scores.masked_fill(~visible, -math.inf)
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), vv)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return o


def _inputs(B=2, T=19, HQ=4, HKV=2, D=16, seed=0, with_g=False, with_gate=False):
    gen = torch.Generator().manual_seed(seed)
    x = dict(q=torch.randn(B, T, HQ, D, generator=gen), k=torch.randn(B, T, HKV, D, generator=gen),
             v=torch.randn(B, T, HKV, D, generator=gen))
    if with_g:
        x["g"] = torch.nn.functional.logsigmoid(torch.randn(B, T, HQ, generator=gen) + 1)
    if with_gate:
        x["gate"] = torch.randn(B, T, HQ, D, generator=gen)
    return x


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("window,with_g,with_gate", [(0, False, False), (5, False, True), (0, True, True)])
def test_flash_attn_func_forward_and_grads(backend, window, with_g, with_gate):
    x = _inputs(with_g=with_g, with_gate=with_gate)
    leaves = {key: t.clone().requires_grad_(True) for key, t in x.items()}
    kw = {key: leaves[key] for key in ("g", "gate") if key in leaves}
    with ops.use_backend(backend):
        o = ops.flash_attn_func(leaves["q"], leaves["k"], leaves["v"], causal=True,
                                window_size=(window - 1, 0) if window else (-1, -1), **kw)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        rl = {key: t.clone().to(dtype).requires_grad_(True) for key, t in x.items()}
        refs[dtype] = (rl, attention_ref(rl["q"], rl["k"], rl["v"], window=window, g=rl.get("g"), gate=rl.get("gate")))
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    floor = 1e-5
    err, err32 = rel_rms(o, refs[torch.float64][1]), rel_rms(refs[torch.float32][1], refs[torch.float64][1])
    assert err <= 2 * err32 + floor, f"o: {err:.3e} vs fp32 ref {err32:.3e}"
    with ops.use_backend(backend):
        (o * w.float()).sum().backward()
    for dtype, (rl, ro) in refs.items():
        (ro * w.to(dtype)).sum().backward()
    for key, leaf in leaves.items():
        err = rel_rms(leaf.grad, refs[torch.float64][0][key].grad)
        err32 = rel_rms(refs[torch.float32][0][key].grad, refs[torch.float64][0][key].grad)
        assert err <= 2 * err32 + 1e-4, f"d{key}: {err:.3e} vs fp32 ref {err32:.3e}"


def test_varlen_matches_per_sequence():
    cu = [0, 7, 7, 20]
    x = _inputs(B=1, T=20)
    o = ops.flash_attn_varlen_func(x["q"][0], x["k"][0], x["v"][0], torch.tensor(cu), torch.tensor(cu), 13, 13,
                                   causal=True)
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            ref = attention_ref(x["q"][:, a:b].double(), x["k"][:, a:b].double(), x["v"][:, a:b].double())
            assert rel_rms(o[a:b], ref[0]) < 1e-5


def test_kvcache_decode_equals_full_forward():
    """Prefill 6 tokens into a cache, then decode the rest one by one: same as the full causal pass."""
    x = _inputs(B=2, T=11)
    full = ops.flash_attn_func(x["q"], x["k"], x["v"], causal=True)
    B, T, HKV, D = x["k"].shape
    k_cache = torch.zeros(B, 16, HKV, D)
    v_cache = torch.zeros(B, 16, HKV, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outs = [ops.flash_attn_with_kvcache(x["q"][:, :6], k_cache, v_cache, x["k"][:, :6], x["v"][:, :6],
                                        cache_seqlens=seqlens, causal=True)]
    seqlens += 6
    for t in range(6, T):
        outs.append(ops.flash_attn_with_kvcache(x["q"][:, t:t + 1], k_cache, v_cache, x["k"][:, t:t + 1],
                                                x["v"][:, t:t + 1], cache_seqlens=seqlens, causal=True))
        seqlens += 1
    assert rel_rms(torch.cat(outs, dim=1), full) < 1e-5
    torch.testing.assert_close(k_cache[:, :T], x["k"])


def test_softmax_errors_are_value_errors():
    x = _inputs()
    with pytest.raises(ValueError, match="k"):
        ops.flash_attn_func(x["q"], x["k"][..., :8], x["v"], causal=True)
    with pytest.raises(ValueError, match="dropout"):
        ops.flash_attn_func(x["q"], x["k"], x["v"], dropout_p=0.1)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.flash_attn_varlen_func(x["q"][0], x["k"][0], x["v"][0], torch.tensor([0, 19]), torch.tensor([0, 9, 19]),
                                   19, 19)
