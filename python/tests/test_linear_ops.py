"""hla.ops (the linear family) against the independent fp64 torch recurrence in reference.py:
outputs, final states and every gradient, on adversarial cases (T = 1, ragged T, GVA, packed
sequences with empty ones, g = −1000, β ∈ {0, 1}, large initial states), on libhla's chunked CPU
backend and its fp64 reference backend.

Tolerance policy (DESIGN.md): hla in fp32 passes when its error against the fp64 oracle is at most
twice the error of the same oracle evaluated in fp32, plus a small floor. NaN never passes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch

import hla
from hla import ops
from reference import lightning_log_decay, recurrence, rel_rms

FLOOR = 1e-5  # relative RMS floor, the same as the C++ tests (tests/support/linear_case.hpp)
# Gradients of per-layer parameters (A_log, dt_bias, a fixed decay) sum signed per-token terms over
# every token and sequence; the cancellation in that sum amplifies fp32 rounding by the order the
# terms are added, which a chunked backward legitimately changes. Measured: up to ~1e-5 for T = 70.
PARAM_FLOOR = 3e-5
BACKENDS = ["cpu", "reference"]


@dataclasses.dataclass
class Case:
    name: str
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    cu_seqlens: Optional[list] = None
    initial_state: bool = True
    gates: str = "normal"  # normal | extreme (runs of g = −1000 and g = 0) | zero
    betas: str = "uniform"  # uniform | binary (β ∈ {0, 1})
    state_scale: float = 1.0


CASES = [
    Case("T1", B=2, T=1, H=2, HV=2, K=8, V=8),
    Case("ragged_gva", B=2, T=37, H=1, HV=2, K=16, V=8),
    Case("two_chunks", B=1, T=70, H=2, HV=2, K=8, V=16, initial_state=False),
    Case("varlen_empty", B=1, T=41, H=2, HV=4, K=8, V=8, cu_seqlens=[0, 0, 5, 5, 40, 41]),
    Case("extreme_gates", B=2, T=33, H=2, HV=2, K=8, V=8, gates="extreme", betas="binary", state_scale=30.0),
]


# op name -> how to call hla and how to call the reference with the same inputs
OPS = {
    "linear_attn": dict(decay="none", update="additive"),
    "lightning_attn": dict(decay="fixed", update="additive", lightning=True),
    "simple_gla": dict(decay="scalar", update="additive"),
    "simple_gla_gamma": dict(decay="fixed", update="additive"),
    "gla": dict(decay="vector", update="additive"),
    "delta_rule": dict(decay="none", update="delta"),
    "delta_rule_l2": dict(decay="none", update="delta", qk_l2norm=True),
    "gated_delta_rule": dict(decay="scalar", update="delta", qk_l2norm=True),
    "gated_delta_rule_gate": dict(decay="scalar", update="delta", gate="softplus_decay", beta_activation="sigmoid"),
    "gated_delta_rule_negeig": dict(decay="scalar", update="delta", beta_activation="sigmoid2x"),
    "kda": dict(decay="vector", update="delta", qk_l2norm=True),
    "kda_gate": dict(decay="vector", update="delta", gate="softplus_decay", qk_l2norm=True),
    "kda_bounded": dict(decay="vector", update="delta", gate="bounded_sigmoid", lower_bound=-3.0),
}


def make_inputs(case: Case, spec: dict, seed: int = 0):
    """Random fp32 leaf tensors for one op and case (the gates in the op's own convention)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).float()

    x = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V))
    if not spec.get("qk_l2norm") and spec["update"] == "delta":
        # the plain delta rule is stable for ‖k‖² β ≤ 2: unit-norm keys, as models feed it
        x["k"] = torch.nn.functional.normalize(x["k"], dim=-1)
    decay, gate = spec["decay"], spec.get("gate", "none")
    if decay == "fixed" and not spec.get("lightning"):
        x["g"] = -torch.rand(HV, generator=gen) * 0.5
    elif decay in ("scalar", "vector"):
        shape = (B, T, HV) if decay == "scalar" else (B, T, HV, K)
        if gate == "none":
            g = torch.nn.functional.logsigmoid(randn(*shape) + 2.0)  # log decay in (−∞, 0)
            if case.gates == "extreme":
                g = g.clone()
                g[:, ::3] = -1000.0  # a forget-everything token every third step
                g[:, 1::5] = 0.0     # and some that keep everything
        else:
            g = randn(*shape)  # raw gate input
            if case.gates == "extreme":
                g = g.clone()
                g[:, ::3] = 1000.0 if gate == "softplus_decay" else 50.0
        x["g"] = g.float()
        if gate != "none":
            x["A_log"] = randn(HV, s=0.5)
            x["dt_bias"] = randn(*((HV,) if decay == "scalar" else (HV, K)), s=0.5)
    if spec["update"] == "delta":
        if spec.get("beta_activation", "none") != "none":
            b = randn(B, T, HV)  # logits
        elif case.betas == "binary":
            b = (torch.rand(B, T, HV, generator=gen) > 0.5).float()
        else:
            b = torch.rand(B, T, HV, generator=gen)
        x["beta"] = b
    if case.initial_state:
        N = B if case.cu_seqlens is None else len(case.cu_seqlens) - 1
        x["initial_state"] = randn(N, HV, K, V, s=case.state_scale)
    return x


def call_hla(name: str, x: dict, cu_seqlens, layer=(1, 4), output_final_state=True, recurrent=False):
    """The public fla-style op for `name` on inputs x."""
    spec = OPS[name]
    common = dict(initial_state=x.get("initial_state"), output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    q, k, v = x["q"], x["k"], x["v"]
    pre = "fused_recurrent_" if recurrent else "chunk_"
    if name == "linear_attn":
        return getattr(ops, pre + "linear_attn")(q, k, v, normalize=False, **common)
    if name == "lightning_attn":
        return getattr(ops, pre + "lightning_attn")(q, k, v, layer[0], layer[1], **common)
    if name == "simple_gla":
        return getattr(ops, pre + "simple_gla")(q, k, v, g=x["g"], **common)
    if name == "simple_gla_gamma":
        return getattr(ops, pre + "simple_gla")(q, k, v, g_gamma=x["g"], **common)
    if name == "gla":
        if recurrent:
            return ops.fused_recurrent_gla(q, k, v, gk=x["g"], **common)
        return ops.chunk_gla(q, k, v, x["g"], **common)
    if name.startswith("delta_rule"):
        return getattr(ops, pre + "delta_rule")(q, k, v, x["beta"], use_qk_l2norm_in_kernel=spec.get("qk_l2norm", False),
                                               **common)
    extra = dict(use_qk_l2norm_in_kernel=spec.get("qk_l2norm", False),
                 use_beta_sigmoid_in_kernel=spec.get("beta_activation", "none") != "none",
                 allow_neg_eigval=spec.get("beta_activation") == "sigmoid2x")
    if spec.get("gate", "none") != "none":
        extra.update(use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"])
    if name.startswith("gated_delta_rule"):
        if recurrent:
            return ops.fused_recurrent_gated_delta_rule(q, k, v, g=x["g"], beta=x["beta"], **extra, **common)
        return ops.chunk_gated_delta_rule(q, k, v, x["g"], x["beta"], **extra, **common)
    if name.startswith("kda"):
        if "dt_bias" in extra:
            extra["dt_bias"] = extra["dt_bias"].reshape(-1)  # fla passes KDA's dt_bias flat, [HV*K]
        if spec.get("lower_bound") is not None:
            extra["lower_bound"] = spec["lower_bound"]
        return getattr(ops, pre + "kda")(q, k, v, x["g"], x["beta"], **extra, **common)
    raise KeyError(name)


def call_reference(name: str, x: dict, cu_seqlens, dtype, layer=(1, 4)):
    spec = OPS[name]
    y = {key: t.to(dtype) for key, t in x.items()}
    g = y.get("g")
    if spec.get("lightning"):
        g = lightning_log_decay(x["v"].shape[2], *layer).to(dtype)
    return recurrence(y["q"], y["k"], y["v"], decay=spec["decay"], update=spec["update"], g=g, beta=y.get("beta"),
                      initial_state=y.get("initial_state"), cu_seqlens=cu_seqlens,
                      qk_l2norm=spec.get("qk_l2norm", False), gate=spec.get("gate", "none"), A_log=y.get("A_log"),
                      dt_bias=y.get("dt_bias"), lower_bound=spec.get("lower_bound", -5.0),
                      beta_activation=spec.get("beta_activation", "none"))


def _cu(case):
    return None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int64)


def _check(label, got, ref64, ref32, floor=FLOOR):
    err = rel_rms(got, ref64)
    err32 = rel_rms(ref32, ref64)
    assert math.isfinite(err), f"{label}: non-finite values"
    assert err <= 2 * err32 + floor, f"{label}: rel RMS {err:.3e} > 2 * {err32:.3e} (fp32 reference) + {floor:g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", list(OPS))
def test_forward_and_gradients(name, case, backend):
    x = make_inputs(case, OPS[name])
    cu = _cu(case)
    leaves = {key: t.clone().requires_grad_(True) for key, t in x.items()}
    with ops.use_backend(backend):
        o, ht = call_hla(name, leaves, cu)
    assert o.shape == x["v"].shape and o.dtype == torch.float32
    N = case.B if cu is None else len(case.cu_seqlens) - 1
    assert ht.shape == (N, case.HV, case.K, case.V) and ht.dtype == torch.float32

    refs = {}
    for dtype in (torch.float64, torch.float32):
        rl = {key: t.clone().to(dtype).requires_grad_(True) for key, t in x.items()}
        ro, rht = call_reference(name, rl, cu, dtype)
        refs[dtype] = (rl, ro, rht)
    _, o64, ht64 = refs[torch.float64]
    _, o32, ht32 = refs[torch.float32]
    _check(f"{name}/{case.name}/{backend}: o", o, o64, o32)
    _check(f"{name}/{case.name}/{backend}: final_state", ht, ht64, ht32)

    # One random cotangent for both outputs, the same for all three runs.
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    w_h = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    with ops.use_backend(backend):
        ((o * w_o.float()).sum() + (ht * w_h.float()).sum()).backward()
    for dtype, (rl, ro, rht) in refs.items():
        ((ro * w_o.to(dtype)).sum() + (rht * w_h.to(dtype)).sum()).backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None, f"{name}/{case.name}: no gradient for {key}"
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        reduced = key in ("A_log", "dt_bias") or (key == "g" and OPS[name]["decay"] == "fixed")
        floor = PARAM_FLOOR if reduced else FLOOR
        if (key == "A_log" and backend == "cpu" and OPS[name]["decay"] == "vector" and OPS[name].get("gate")
                == "softplus_decay" and case.gates == "extreme"):
            # docs/design.md, known limitation: the chunked backward's vector-decay dg is a reverse
            # cumulative sum whose fp32 noise the raw gate input (1000 here) amplifies in dA_log; measured
            # 4.4e-4 relative. Bounded here so a regression past that still fails.
            floor = 1e-3
        _check(f"{name}/{case.name}/{backend}: d{key}", leaf.grad, refs[torch.float64][0][key].grad,
               refs[torch.float32][0][key].grad, floor)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=lambda c: c.name)
@pytest.mark.parametrize("name", list(OPS))
def test_fused_recurrent_matches_reference(name, case):
    """fused_recurrent_* (libhla's decode step when there is no cu_seqlens) computes the same
    recurrence, returns a new final state and leaves initial_state alone."""
    x = make_inputs(case, OPS[name], seed=3)
    cu = _cu(case)
    h0 = x.get("initial_state")
    h0_before = None if h0 is None else h0.clone()
    with torch.no_grad():
        o, ht = call_hla(name, x, cu, recurrent=True)
    o64, ht64 = call_reference(name, x, cu, torch.float64)
    o32, ht32 = call_reference(name, x, cu, torch.float32)
    _check(f"fused_recurrent {name}/{case.name}: o", o, o64, o32)
    _check(f"fused_recurrent {name}/{case.name}: final_state", ht, ht64, ht32)
    if h0 is not None:
        assert torch.equal(h0, h0_before), "fused_recurrent modified initial_state"


@pytest.mark.filterwarnings("ignore:Input #")  # fp32 inputs, on purpose (libhla takes no fp64)
@pytest.mark.parametrize("name", ["linear_attn", "gla", "gated_delta_rule_gate", "kda_bounded"])
def test_gradcheck_tiny(name):
    """torch.autograd.gradcheck on the op itself (fp32, so finite differences need loose bounds);
    the tight check is test_forward_and_gradients against the fp64 reference."""
    case = Case("tiny", B=1, T=3, H=1, HV=1, K=4, V=3)
    x = make_inputs(case, OPS[name], seed=5)
    keys = sorted(x)

    def f(*tensors):
        o, ht = call_hla(name, dict(zip(keys, tensors)), None)
        return o, ht

    inputs = tuple(x[key].clone().requires_grad_(True) for key in keys)
    with ops.use_backend("reference"):
        assert torch.autograd.gradcheck(f, inputs, eps=2e-3, atol=2e-3, rtol=2e-2, nondet_tol=1e-5)


def test_output_final_state_false_and_no_initial_state():
    case = Case("plain", B=2, T=9, H=2, HV=2, K=8, V=8, initial_state=False)
    x = make_inputs(case, OPS["gated_delta_rule"])
    o, ht = ops.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=False,
                                       use_qk_l2norm_in_kernel=True)
    assert ht is None
    o64, _ = call_reference("gated_delta_rule", x, None, torch.float64)
    o32, _ = call_reference("gated_delta_rule", x, None, torch.float32)
    _check("no state: o", o, o64, o32)


def test_only_final_state_used_in_loss():
    """A loss on the final state alone: d_o arrives as zeros or None and must be handled."""
    case = Case("state_only", B=1, T=12, H=1, HV=1, K=4, V=4)
    x = make_inputs(case, OPS["kda"])
    leaves = {key: t.clone().requires_grad_(True) for key, t in x.items()}
    _, ht = call_hla("kda", leaves, None)
    ht.sum().backward()
    rl = {key: t.double().requires_grad_(True) for key, t in x.items()}
    _, rht = call_reference("kda", rl, None, torch.float64)
    rht.sum().backward()
    for key in leaves:
        ref = rl[key].grad if rl[key].grad is not None else torch.zeros_like(rl[key])  # q: no path to the state
        assert rel_rms(leaves[key].grad, ref) < 1e-4, key


def test_strided_views_of_a_fused_projection():
    """q, k, v sliced out of one [B, T, 3, H, D] tensor: no copy needed, same result as contiguous."""
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 10, 3, 2, 8, generator=gen)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    g = torch.nn.functional.logsigmoid(torch.randn(2, 10, 2, generator=gen))
    o1, _ = ops.chunk_simple_gla(q, k, v, g=g)
    o2, _ = ops.chunk_simple_gla(q.contiguous(), k.contiguous(), v.contiguous(), g=g)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    # innermost-strided inputs are copied by the glue rather than rejected
    o3, _ = ops.chunk_simple_gla(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, g=g)
    torch.testing.assert_close(o1, o3, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16/fp16 inputs: o in the input dtype, gradients in the input dtypes, errors within the
    precision's own reference error (oracle evaluated on the rounded inputs)."""
    case = Case("half", B=1, T=20, H=2, HV=2, K=8, V=8)
    x = make_inputs(case, OPS["gated_delta_rule"])
    xh = {key: (t.to(dtype) if key != "initial_state" else t) for key, t in x.items()}
    leaves = {key: t.clone().requires_grad_(True) for key, t in xh.items()}
    o, ht = call_hla("gated_delta_rule", leaves, None)
    assert o.dtype == dtype and ht.dtype == torch.float32
    o.float().sum().backward()
    for key, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, key
    o64, _ = call_reference("gated_delta_rule", {k_: t.float() for k_, t in xh.items()}, None, torch.float64)
    # the output itself is rounded to `dtype`: half an ulp relative, 2^-8 (bf16) or 2^-11 (fp16)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel_rms(o, o64) < 4 * eps


def test_linear_attn_normalize_matches_fla_formula():
    """normalize=True (fla's default): o_t / (scale q_t · (z_0 + Σ k) + 1e-10), with (kv, z) states."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, K, V = 2, 13, 2, 8, 4
    q = torch.rand(B, T, H, K, generator=gen)  # positive features, as normalized linear attention uses
    k = torch.rand(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    kv0 = torch.randn(B, H, K, V, generator=gen)
    z0 = torch.rand(B, 1, H, K, generator=gen)
    o, (kv, z) = ops.chunk_linear_attn(q, k, v, initial_state=(kv0, z0), output_final_state=True)
    s = K ** -0.5
    num, kv_ref = recurrence(q.double(), k.double(), v.double(), initial_state=kv0.double())
    zc = z0.double().squeeze(1)[:, None] + torch.cumsum(k.double(), dim=1)  # [B, T, H, K]
    den = (s * q.double() * zc).sum(-1, keepdim=True) + 1e-10
    assert rel_rms(o, num / den) < 1e-5
    assert rel_rms(kv, kv_ref) < 1e-5
    assert rel_rms(z, zc[:, -1:]) < 1e-5


def test_lightning_decay_matches_minimax():
    for H, idx, n in [(8, 0, 4), (8, 3, 4), (64, 5, 80)]:
        got = ops.lightning_attn_log_decay(H, idx, n)
        assert got.dtype == torch.float32 and got.shape == (H,)
        assert rel_rms(got, lightning_log_decay(H, idx, n)) < 1e-6


def test_decode_slots_and_skips():
    """hla.ops.decode: per-sequence state slots picked by state_indices, updated in place; a negative
    index skips its sequence and leaves its output untouched."""
    gen = torch.Generator().manual_seed(2)
    N, H, K, V, S = 3, 2, 8, 8, 5
    cfg = ops.make_config("scalar", "delta", qk_l2norm=True)
    state = torch.randn(S, H, K, V, generator=gen)
    before = state.clone()
    q, k = torch.randn(N, 1, H, K, generator=gen), torch.randn(N, 1, H, K, generator=gen)
    v = torch.randn(N, 1, H, V, generator=gen)
    g = -torch.rand(N, 1, H, generator=gen)
    beta = torch.rand(N, 1, H, generator=gen)
    idx = torch.tensor([4, -1, 0], dtype=torch.int32)
    out = torch.full((N, 1, H, V), 123.0)
    ops.decode(cfg, q, k, v, g, beta, None, None, state, idx, out=out)
    assert torch.all(out[1] == 123.0)
    for n, slot in [(0, 4), (2, 0)]:
        o_ref, s_ref = recurrence(q[n:n + 1].double(), k[n:n + 1].double(), v[n:n + 1].double(), decay="scalar",
                                  update="delta", g=g[n:n + 1].double(), beta=beta[n:n + 1].double(),
                                  initial_state=before[slot:slot + 1].double(), qk_l2norm=True)
        assert rel_rms(out[n:n + 1], o_ref) < 1e-5
        assert rel_rms(state[slot:slot + 1], s_ref) < 1e-5
    for slot in (1, 2, 3):
        assert torch.equal(state[slot], before[slot])


# ---- bad input reaches the user as ValueError ---------------------------------------------------

def _gdn_inputs():
    x = make_inputs(Case("err", B=2, T=5, H=2, HV=2, K=8, V=8), OPS["gated_delta_rule"])
    return x["q"], x["k"], x["v"], x["g"], x["beta"]


def test_error_wrong_shape_names_the_argument():
    q, k, v, g, beta = _gdn_inputs()
    with pytest.raises(ValueError, match=r"k.*expected shape"):
        ops.chunk_gated_delta_rule(q, k[..., :4], v, g, beta)


def test_error_wrong_dtype():
    q, k, v, g, beta = _gdn_inputs()
    with pytest.raises(ValueError, match=r"q.*f64"):
        ops.chunk_gated_delta_rule(q.double(), k, v, g, beta)


def test_error_bad_cu_seqlens():
    q, k, v, g, beta = (t[:1] for t in _gdn_inputs())
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.chunk_gated_delta_rule(*_gdn_inputs(), cu_seqlens=torch.tensor([0, 5]))


def test_error_initial_state_dtype_and_count():
    q, k, v, g, beta = _gdn_inputs()
    with pytest.raises(ValueError, match="initial_state"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="initial_state"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(3, 2, 8, 8))


def test_error_gva_heads_and_options():
    q, k, v, g, beta = _gdn_inputs()
    with pytest.raises(ValueError, match="HV"):
        ops.chunk_delta_rule(q, k, torch.randn(2, 5, 3, 8), torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="state_v_first"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, state_v_first=True)
    with pytest.raises(ValueError, match="A_log"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="lower_bound"):
        ops.chunk_kda(q, k, v, torch.randn(2, 5, 2, 8), beta, use_gate_in_kernel=True, A_log=torch.zeros(2),
                      lower_bound=-7.0)
    with pytest.raises(ValueError, match="layer_idx"):
        ops.chunk_lightning_attn(q, k, v, 4, 4)
    with pytest.raises(TypeError):
        ops.chunk_gla(q, k, v, torch.randn(2, 5, 2, 8), bogus=1)


def test_error_backend_needs_matching_device():
    q, k, v, g, beta = _gdn_inputs()
    with ops.use_backend("cuda"):
        with pytest.raises(ValueError, match="cuda"):
            ops.chunk_gated_delta_rule(q, k, v, g, beta)
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("tpu"):
            pass


def test_package_basics():
    assert isinstance(hla.cuda_available(), bool)
    assert hla.num_threads() >= 1
