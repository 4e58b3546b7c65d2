"""The same checks on CUDA tensors (libhla's CUDA backend), against the fp64 CPU oracles of
reference.py / test_softmax_ops.py. Skipped without a GPU or without hla's CUDA backend.

Tolerances are the C++ CUDA tests' (tests/test_linear_cuda.cpp, tests/test_softmax_cuda.cpp):
forward by the policy (2 × the fp32 reference's error + 1e-5), gradients 2e-4 relative RMS in fp32,
bf16 outputs within a few bf16 ulps.
"""
import copy
import dataclasses

import pytest
import torch

import hla
from hla import ops
from hla.layers import LayerCache
from reference import rel_rms
from test_layers import REFS, make_layers
from test_linear_ops import CASES, OPS, call_hla, call_reference, make_inputs
from test_softmax_ops import attention_ref

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and hla.cuda_available()),
                                reason="needs a CUDA GPU and hla built with its CUDA backend")

DEV = "cuda"
# The CUDA chunked forward takes head dims K, V ∈ {64, 128} (others are a clear error), so the CPU
# suite's cases run here with K = V = 64.
CUDA_CASES = [dataclasses.replace(c, K=64, V=64) for c in CASES]


def _to(x, device):
    return {key: t.to(device) for key, t in x.items()}


@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", list(OPS))
def test_linear_ops_cuda_forward_and_gradients(name, case):
    x = make_inputs(case, OPS[name])
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens)
    leaves = {key: t.clone().to(DEV).requires_grad_(True) for key, t in x.items()}
    o, ht = call_hla(name, leaves, None if cu is None else cu.to(DEV))
    assert o.is_cuda and ht.is_cuda
    refs = {}
    for dtype in (torch.float64, torch.float32):
        rl = {key: t.clone().to(dtype).requires_grad_(True) for key, t in x.items()}
        refs[dtype] = (rl,) + tuple(call_reference(name, rl, cu, dtype))
    for label, got, i in (("o", o, 1), ("final_state", ht, 2)):
        err, err32 = rel_rms(got.cpu(), refs[torch.float64][i]), rel_rms(refs[torch.float32][i], refs[torch.float64][i])
        assert err <= 2 * err32 + 1e-5, f"{name}/{case.name}: {label} rel RMS {err:.3e} (fp32 reference {err32:.3e})"
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    w_h = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    ((o * w_o.float().to(DEV)).sum() + (ht * w_h.float().to(DEV)).sum()).backward()
    # Gradients by the same policy as the CPU suite: 2 × the fp32 recurrence's error plus a floor (2e-4,
    # the C++ CUDA tests' fp32 gradient bound). The fp32 term matters where a gradient lives below fp32's
    # range (dinitial_state behind a g = −1000 token is ~e^-500 in fp64 and 0 in any fp32 computation).
    for dtype in (torch.float64, torch.float32):
        rl, ro, rht = refs[dtype]
        ((ro * w_o.to(dtype)).sum() + (rht * w_h.to(dtype)).sum()).backward()
    rl64, rl32 = refs[torch.float64][0], refs[torch.float32][0]
    for key, leaf in leaves.items():
        tol = 2e-4
        if key == "A_log" and OPS[name]["decay"] == "vector" and case.gates == "extreme":
            tol = 1e-3  # docs/design.md: vector-decay dA_log with raw gate inputs near 1000
        err = rel_rms(leaf.grad.cpu(), rl64[key].grad)
        err32 = rel_rms(rl32[key].grad, rl64[key].grad)
        assert err <= 2 * err32 + tol, f"{name}/{case.name}: d{key} rel RMS {err:.3e} > 2 * {err32:.3e} + {tol:g}"


@pytest.mark.parametrize("name", ["simple_gla", "gated_delta_rule", "kda_gate", "lightning_attn"])
def test_fused_recurrent_decode_cuda(name):
    case = CUDA_CASES[1]
    x = make_inputs(case, OPS[name], seed=3)
    with torch.no_grad():
        o, ht = call_hla(name, _to(x, DEV), None, recurrent=True)
    o64, ht64 = call_reference(name, x, None, torch.float64)
    assert rel_rms(o.cpu(), o64) < 1e-5 and rel_rms(ht.cpu(), ht64) < 1e-5


def test_ops_follow_the_current_torch_stream():
    """hla launches on torch's current stream: work queued on a side stream just before (the inputs,
    written there) is seen, and the result matches the default-stream call."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 200, 2, 64, 64
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    args = [t.to(DEV) for t in (q, k, v, g, beta)]
    expect, _ = ops.chunk_gated_delta_rule(*args, use_qk_l2norm_in_kernel=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # args were written on the default stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)  # delays the side stream, so an unordered read would see zeros
        side_args = [torch.zeros_like(t) for t in args]
        for dst, src in zip(side_args, args):
            dst.copy_(src)
        got, _ = ops.chunk_gated_delta_rule(*side_args, use_qk_l2norm_in_kernel=True)
    side.synchronize()
    assert torch.equal(got, expect)


def test_decode_step_captured_by_torch_cuda_graph():
    """The decode step as a serving loop runs it: captured once by torch.cuda.graph, replayed; the
    replay gives bit-for-bit the eager step's output and state."""
    gen = torch.Generator().manual_seed(6)
    N, H, K, V = 3, 2, 64, 64
    cfg = ops.make_config("scalar", "delta", None, True, "none", None, "sigmoid")
    q, k = (torch.randn(N, 1, H, K, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    v = torch.randn(N, 1, H, V, generator=gen).to(DEV, torch.bfloat16)
    g = (-torch.rand(N, 1, H, generator=gen)).to(DEV)
    beta = torch.randn(N, 1, H, generator=gen).to(DEV)
    state0 = torch.randn(N, H, K, V, generator=gen).to(DEV)
    eager_state = state0.clone()
    eager_o = ops.decode(cfg, q, k, v, g, beta, None, None, eager_state)
    graph_state, graph_o = state0.clone(), torch.empty_like(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode(cfg, q, k, v, g, beta, None, None, graph_state, None, graph_o)
    assert torch.equal(graph_state, state0), "capture must record the step, not run it"
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_o, eager_o) and torch.equal(graph_state, eager_state)


def test_bf16_linear_cuda():
    case = CUDA_CASES[2]
    x = make_inputs(case, OPS["gated_delta_rule"])
    xh = {key: (t.to(torch.bfloat16) if key != "initial_state" else t) for key, t in x.items()}
    o, ht = call_hla("gated_delta_rule", _to(xh, DEV), None)
    assert o.dtype == torch.bfloat16
    o64, _ = call_reference("gated_delta_rule", {k: t.float() for k, t in xh.items()}, None, torch.float64)
    assert rel_rms(o.cpu(), o64) < 4 * 2.0 ** -8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_cuda(dtype):
    gen = torch.Generator().manual_seed(0)
    B, T, HQ, HKV, D = 2, 77, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, generator=gen).to(dtype) for h in (HQ, HKV, HKV))
    gate = torch.randn(B, T, HQ, D, generator=gen).to(dtype)
    leaves = [t.to(DEV).clone().requires_grad_(True) for t in (q, k, v, gate)]
    o = ops.flash_attn_func(*leaves[:3], causal=True, gate=leaves[3])
    rl = [t.double().requires_grad_(True) for t in (q, k, v, gate)]
    ref = attention_ref(*rl[:3], gate=rl[3])
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel_rms(o.float().cpu(), ref) < 4 * eps
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    (o.float() * w.float().to(DEV)).sum().backward()
    (ref * w).sum().backward()
    for name, a, b in zip("q k v gate".split(), leaves, rl):
        assert rel_rms(a.grad.float().cpu(), b.grad) < 16 * eps, name


@pytest.mark.parametrize("name", ["gated_deltanet", "kimi_delta", "lightning"])
def test_linear_layers_cuda(name):
    """fp32 layer on CUDA: the HF-formula composition's output, and cached decode == full forward."""
    layer = make_layers(head_dim=64, attn_head_dim=64)[name]
    x = torch.randn(2, 16, layer_hidden(layer), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = REFS[name](copy.deepcopy(layer).double(), x.double())
        gpu = copy.deepcopy(layer).to(DEV)
        xg = x.to(DEV)
        full = gpu(xg)
        cache = LayerCache()
        steps = torch.cat([gpu(xg[:, :5], cache=cache)] + [gpu(xg[:, t:t + 1], cache=cache) for t in range(5, 16)], 1)
    assert rel_rms(full.cpu(), ref) < 1e-4
    assert rel_rms(steps, full) < 1e-5


def test_gated_attention_cuda_bf16():
    layer = make_layers(head_dim=64, attn_head_dim=64)["gated_attention"]
    x = torch.randn(2, 16, layer_hidden(layer), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = layer(x)  # CPU fp32
        gpu = copy.deepcopy(layer).to(DEV, torch.bfloat16)
        xg = x.to(DEV, torch.bfloat16)
        full = gpu(xg)
        cache = LayerCache()
        steps = torch.cat([gpu(xg[:, :5], cache=cache)] + [gpu(xg[:, t:t + 1], cache=cache) for t in range(5, 16)], 1)
    assert rel_rms(full.float().cpu(), ref) < 0.05
    assert rel_rms(steps.float(), full.float()) < 0.02


def layer_hidden(layer):
    return next(m for m in layer.modules() if isinstance(m, torch.nn.Linear)).in_features


@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet", "gla"])
def test_cuda_matches_cpu_at_the_mqar_shape(mixer):
    """The `hla.mqar --gpu` layer shape (B = 64, T = 256, H = 2, K = V = 64, fp32, q/k/v strided slices
    of one projection, in-kernel L2 norm and gates): the CUDA forward and every gradient equal the CPU
    backend's, which learns the task (bench/results/mqar_gpu.md)."""
    B, T, H, D = 64, 256, 2, 64
    gen = torch.Generator().manual_seed(0)
    raw = dict(x=torch.randn(B, T, 3, H, D, generator=gen), beta=torch.randn(B, T, H, generator=gen),
               gate=0.1 * torch.randn(B, T, H, generator=gen), gvec=-0.1 * torch.rand(B, T, H, D, generator=gen),
               A_log=torch.zeros(H), dt_bias=torch.full((H,), -4.6))
    d_o = torch.randn(B, T, H, D, generator=gen)

    def run(device):
        t = {key: v.to(device).requires_grad_(True) for key, v in raw.items()}
        q, k, v = t["x"].unbind(2)
        if mixer == "deltanet":
            o, _ = ops.chunk_delta_rule(q, k, v, torch.sigmoid(t["beta"]), use_qk_l2norm_in_kernel=True)
        elif mixer == "gated_deltanet":
            o, _ = ops.chunk_gated_delta_rule(q, k, v, t["gate"], t["beta"], use_qk_l2norm_in_kernel=True,
                                              use_gate_in_kernel=True, A_log=t["A_log"], dt_bias=t["dt_bias"],
                                              use_beta_sigmoid_in_kernel=True)
        else:
            o, _ = ops.linear(ops.make_config("vector", "additive", qk_l2norm=True), q, k, v, t["gvec"])
        (o * d_o.to(device)).sum().backward()
        return {"o": o.detach().cpu(), **{key: v.grad.cpu() for key, v in t.items() if v.grad is not None}}

    cuda, cpu = run(DEV), run("cpu")
    assert cuda.keys() == cpu.keys()
    for key in cpu:
        assert torch.isfinite(cuda[key]).all(), key
        assert rel_rms(cuda[key], cpu[key]) < 1e-5, f"{mixer}: {key} rel RMS {rel_rms(cuda[key], cpu[key]):.2e}"


@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet", "linear_attn"])
def test_mqar_trains_alike_on_cuda_and_cpu(mixer):
    """Ten training steps of the MQAR model from one initialisation: the CUDA losses follow the CPU
    ones (fp32 on both; bench/results/mqar_gpu.md, where the delta-rule models did not learn on CUDA)."""
    from hla import mqar
    args = mqar.argparse.Namespace(seed=0, vocab=256, head_dim=64, lr=3e-3, steps=100, batch=8, seq_len=128, pairs=16)
    for step, cpu, cuda in mqar.compare_devices(mixer, 128, args, 10):
        assert abs(cuda - cpu) <= 1e-3 * abs(cpu), f"{mixer} step {step}: cpu {cpu:.6f} cuda {cuda:.6f}"
