"""hla.layers: each layer against an independent torch composition of its Hugging Face formulas
(written here, with reference.recurrence / an explicit attention as the mixer), outputs and every
parameter gradient; decode through the layer cache equals the full-sequence forward; checkpoint
parameter names; and, where transformers is installed, the layers against transformers' own modules.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hla.layers import GatedAttention, GatedDeltaNet, KimiDeltaAttention, LayerCache, LightningAttention
from reference import lightning_log_decay, recurrence, rel_rms
from test_softmax_ops import attention_ref

HIDDEN = 32


def _randomize(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial parameters: random projections and norms, decay rates that neither vanish nor
    saturate."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 4, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if "q_norm" not in name and "k_norm" not in name
                        else 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return layer


def make_layers(head_dim=8, attn_head_dim=16):
    """The layers under test; the CUDA tests pass head dims its kernels take (64 / 128)."""
    d = head_dim
    return {
        "gated_deltanet": _randomize(GatedDeltaNet(HIDDEN, num_k_heads=2, num_v_heads=4, head_k_dim=d, head_v_dim=d)),
        "kimi_delta": _randomize(KimiDeltaAttention(HIDDEN, num_heads=2, head_dim=d)),
        "kimi_delta_bounded": _randomize(KimiDeltaAttention(HIDDEN, num_heads=2, head_dim=d, lower_bound=-4.0)),
        "lightning": _randomize(LightningAttention(HIDDEN, num_heads=2, head_dim=d, layer_idx=1, num_layers=4)),
        "gated_attention": _randomize(GatedAttention(HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=attn_head_dim)),
    }


# ---- independent compositions of the Hugging Face formulas -----------------------------------------

def _conv_silu(x, weight):
    """HF's torch_causal_conv1d_fn: depthwise conv, left padding W−1, SiLU. x [B, T, C]."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight, padding=weight.shape[-1] - 1, groups=x.shape[-1])[..., :T]
    return F.silu(y).transpose(1, 2)


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_gated_deltanet(m: GatedDeltaNet, x):
    B, T, _ = x.shape
    nk, nv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    G = nv // nk
    qkvz = m.in_proj_qkvz(x).view(B, T, nk, 2 * dk + 2 * G * dv)
    q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
    v = qkvz[..., 2 * dk:2 * dk + G * dv].reshape(B, T, nv, dv)
    z = qkvz[..., 2 * dk + G * dv:].reshape(B, T, nv, dv)
    ba = m.in_proj_ba(x).view(B, T, nk, 2 * G)
    b, a = ba[..., :G].reshape(B, T, nv), ba[..., G:].reshape(B, T, nv)
    mixed = _conv_silu(torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1), m.conv1d.weight)
    q = mixed[..., :nk * dk].reshape(B, T, nk, dk)
    k = mixed[..., nk * dk:2 * nk * dk].reshape(B, T, nk, dk)
    v = mixed[..., 2 * nk * dk:].reshape(B, T, nv, dv)
    g = -m.A_log.exp() * F.softplus(a + m.dt_bias)
    o, _ = recurrence(q, k, v, decay="scalar", update="delta", g=g, beta=torch.sigmoid(b), qk_l2norm=True)
    o = _rms(o, m.norm.weight, m.norm.variance_epsilon) * F.silu(z)
    return m.out_proj(o.reshape(B, T, -1))


def ref_kimi_delta(m: KimiDeltaAttention, x):
    B, T, _ = x.shape
    H, K = m.num_heads, m.head_dim
    q = _conv_silu(m.q_proj(x), m.q_conv1d.weight).view(B, T, H, K)
    k = _conv_silu(m.k_proj(x), m.k_conv1d.weight).view(B, T, H, K)
    v = _conv_silu(m.v_proj(x), m.v_conv1d.weight).view(B, T, H, K)
    f = m.f_b_proj(m.f_a_proj(x)).view(B, T, H, K) + m.dt_bias.view(H, K)
    A = m.A_log.view(1, 1, H, 1).exp()
    g = -A * F.softplus(f) if m.lower_bound is None else m.lower_bound * torch.sigmoid(A * f)
    o, _ = recurrence(q, k, v, decay="vector", update="delta", g=g, beta=torch.sigmoid(m.b_proj(x)), qk_l2norm=True)
    gate = m.g_b_proj(m.g_a_proj(x)).view(B, T, H, K)
    o = _rms(o, m.o_norm.weight, m.o_norm.variance_epsilon) * torch.sigmoid(gate)
    return m.o_proj(o.reshape(B, T, -1))


def ref_lightning(m: LightningAttention, x):
    B, T, _ = x.shape
    H, D = m.num_heads, m.head_dim
    qkv = F.silu(m.qkv_proj(x)).view(B, T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    g = lightning_log_decay(H, m.layer_idx, m.num_layers).to(x.dtype)
    o, _ = recurrence(q, k, v, decay="fixed", g=g, scale=1.0)  # MiniMax does not scale q
    o = _rms(o.reshape(B, T, H * D), m.norm.weight, m.norm.variance_epsilon)
    return m.out_proj(torch.sigmoid(m.output_gate(x)) * o)


def ref_gated_attention(m: GatedAttention, x):
    B, T, _ = x.shape
    H, HKV, D = m.num_heads, m.num_kv_heads, m.head_dim
    qg = m.q_proj(x).view(B, T, H, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    q = _rms(q, 1 + m.q_norm.weight, m.q_norm.eps)
    k = _rms(m.k_proj(x).view(B, T, HKV, D), 1 + m.k_norm.weight, m.k_norm.eps)
    v = m.v_proj(x).view(B, T, HKV, D)
    r = m.rotary_dim
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=x.dtype) / r))
    ang = torch.arange(T, dtype=x.dtype)[:, None] * inv  # [T, r/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(t):  # rotate-half on the first r channels: pairs (i, i + r/2)
        a, b, rest = t[..., :r // 2], t[..., r // 2:r], t[..., r:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)

    o = attention_ref(rope(q), rope(k), v, gate=gate)
    return m.o_proj(o.reshape(B, T, H * D))


REFS = {"gated_deltanet": ref_gated_deltanet, "kimi_delta": ref_kimi_delta, "kimi_delta_bounded": ref_kimi_delta,
        "lightning": ref_lightning, "gated_attention": ref_gated_attention}


@pytest.mark.parametrize("name", list(REFS))
def test_layer_matches_hf_formulas_with_gradients(name):
    layer = make_layers()[name]
    x = torch.randn(2, 21, HIDDEN, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 21, HIDDEN, generator=torch.Generator().manual_seed(2))
    xh = x.clone().requires_grad_(True)
    out = layer(xh)
    (out * w).sum().backward()
    refs = {}
    for dtype in (torch.float64, torch.float32):
        m = copy.deepcopy(layer).to(dtype)
        m.zero_grad()
        xr = x.to(dtype).requires_grad_(True)
        ro = REFS[name](m, xr)
        (ro * w.to(dtype)).sum().backward()
        refs[dtype] = (m, xr, ro)
    err = rel_rms(out, refs[torch.float64][2])
    err32 = rel_rms(refs[torch.float32][2], refs[torch.float64][2])
    assert err <= 2 * err32 + 1e-5, f"{name}: output rel RMS {err:.3e} vs fp32 composition {err32:.3e}"
    err = rel_rms(xh.grad, refs[torch.float64][1].grad)
    assert err <= 2 * rel_rms(refs[torch.float32][1].grad, refs[torch.float64][1].grad) + 1e-5, f"dx {err:.3e}"
    p64 = dict(refs[torch.float64][0].named_parameters())
    p32 = dict(refs[torch.float32][0].named_parameters())
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}: no finite gradient"
        err = rel_rms(p.grad, p64[pname].grad)
        err32 = rel_rms(p32[pname].grad, p64[pname].grad)
        assert err <= 2 * err32 + 3e-5, f"{name}.{pname}: grad rel RMS {err:.3e} vs fp32 composition {err32:.3e}"


@pytest.mark.parametrize("name", list(REFS))
def test_decode_through_cache_equals_full_forward(name):
    """Prefill 5 tokens, continue with a block of 4, then one token at a time: the outputs equal one
    full-sequence forward."""
    layer = make_layers()[name]
    x = torch.randn(2, 16, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = layer(x)
        cache = LayerCache()
        outs = [layer(x[:, :5], cache=cache), layer(x[:, 5:9], cache=cache)]
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(9, 16)]
    assert cache.seen_tokens == 16
    err = rel_rms(torch.cat(outs, dim=1), full)
    assert err < 1e-5, f"{name}: cached decode differs from the full forward, rel RMS {err:.3e}"


@pytest.mark.parametrize("name", ["gated_deltanet", "kimi_delta", "lightning"])
def test_training_through_a_cache_continues_the_gradient(name):
    """With gradients enabled a cached continuation runs the differentiable chunked path."""
    layer = make_layers()[name]
    x = torch.randn(1, 10, HIDDEN, generator=torch.Generator().manual_seed(4))
    cache = LayerCache()
    y = torch.cat([layer(x[:, :6], cache=cache), layer(x[:, 6:], cache=cache)], dim=1)
    y.sum().backward()
    full = layer(x)
    assert rel_rms(y, full) < 1e-5
    assert all(p.grad is not None for p in layer.parameters())


def test_left_padding_matches_unpadded():
    """attention_mask zeroes padded inputs (HF's rule); with left padding and no cache the real
    tokens see exactly the unpadded sequence."""
    layer = make_layers()["gated_deltanet"]
    x = torch.randn(1, 7, HIDDEN, generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.randn(1, 3, HIDDEN), x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        assert rel_rms(layer(padded, attention_mask=mask)[:, 3:], layer(x)) < 1e-5


CHECKPOINT_NAMES = {
    "gated_deltanet": {"conv1d.weight", "in_proj_qkvz.weight", "in_proj_ba.weight", "dt_bias", "A_log", "norm.weight",
                       "out_proj.weight"},
    "kimi_delta": {"q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
                   "v_conv1d.weight", "A_log", "f_a_proj.weight", "f_b_proj.weight", "dt_bias", "b_proj.weight",
                   "g_a_proj.weight", "g_b_proj.weight", "o_norm.weight", "o_proj.weight"},
    "lightning": {"qkv_proj.weight", "out_proj.weight", "output_gate.weight", "norm.weight"},
    "gated_attention": {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight",
                        "k_norm.weight"},
}


@pytest.mark.parametrize("name", list(CHECKPOINT_NAMES))
def test_checkpoint_parameter_names(name):
    layer = make_layers()[name]
    assert set(layer.state_dict()) == CHECKPOINT_NAMES[name]


def test_lightning_loads_hf_state_dict_with_derived_buffers():
    layer = make_layers()["lightning"]
    sd = dict(layer.state_dict())
    sd["slope_rate"] = torch.zeros(2, 1, 1)  # the HF module's buffers are recomputed, not loaded
    sd["diagonal_decay"] = torch.zeros(1)
    LightningAttention(HIDDEN, 2, 8, 1, 4).load_state_dict(sd, strict=True)


def test_layer_errors():
    with pytest.raises(ValueError, match="num_v_heads"):
        GatedDeltaNet(HIDDEN, num_k_heads=3, num_v_heads=4, head_k_dim=8, head_v_dim=8)
    layer = make_layers()["gated_attention"]
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(1, 4, HIDDEN), attention_mask=torch.tensor([[0, 1, 1, 1]]))


# ---- against transformers, where it is installed ---------------------------------------------------

def _hf_compare(hf_module, ours, x, **kwargs):
    missing, unexpected = hf_module.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(not any(n.endswith(s) for s in ("weight", "A_log", "dt_bias")) for n in missing), missing
    with torch.no_grad():
        ref = hf_module(x, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert rel_rms(ours(x), ref) < 1e-4


def test_against_transformers_qwen3_next():
    tf = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as q3
    cfg = tf.Qwen3NextConfig(hidden_size=HIDDEN, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=8, linear_value_head_dim=8, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                             layer_types=["linear_attention", "full_attention"])
    ours = _randomize(GatedDeltaNet.from_config(cfg, 0))
    _hf_compare(q3.Qwen3NextGatedDeltaNet(cfg, 0), ours, torch.randn(2, 9, HIDDEN))


def test_against_transformers_minimax():
    tf = pytest.importorskip("transformers")
    from transformers.models.minimax import modeling_minimax as mm
    cfg = tf.MiniMaxConfig(hidden_size=HIDDEN, num_attention_heads=2, head_dim=16, num_hidden_layers=4,
                           layer_types=["linear_attention"] * 4)
    ours = _randomize(LightningAttention.from_config(cfg, 1))
    hf = mm.MiniMaxLightningAttention(cfg, 1)
    x = torch.randn(2, 9, HIDDEN)
    _hf_compare(hf, ours, x, position_embeddings=None, attention_mask=None)


def test_against_transformers_qwen3_next_attention():
    tf = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as q3
    cfg = tf.Qwen3NextConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8, num_hidden_layers=2,
                             layer_types=["linear_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    ours = _randomize(GatedAttention.from_config(cfg, 1))
    hf = q3.Qwen3NextAttention(cfg, 1)
    hf.load_state_dict(ours.state_dict(), strict=True)
    T = 9
    x = torch.randn(2, T, HIDDEN)
    position_ids = torch.arange(T).expand(2, T)
    cos_sin = q3.Qwen3NextRotaryEmbedding(config=cfg)(x, position_ids)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = hf(x, position_embeddings=cos_sin, attention_mask=causal)[0]
        assert rel_rms(ours(x), ref) < 1e-4


def test_against_transformers_kimi_linear():
    tf = pytest.importorskip("transformers")
    kl = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    cfg = tf.KimiLinearConfig(hidden_size=HIDDEN, linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4,
                              num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    # transformers' layout (one fused conv1d, gate under forget_gate.) loads into hla's checkpoint layout
    hf = _randomize(kl.KimiLinearDeltaAttention(cfg, 0))
    ours = KimiDeltaAttention.from_config(cfg, 0)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        assert rel_rms(ours(x), hf(x)) < 1e-4


@pytest.mark.parametrize("name", ["gated_deltanet", "kimi_delta", "lightning", "gated_attention"])
def test_bf16_layer_prefill_and_decode(name):
    """A layer cast to bf16 (A_log/dt_bias included) runs prefill and cached decode; outputs stay
    within bf16 rounding of the fp32 layer."""
    layer = make_layers()[name]
    x = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = layer(x)
        half = copy.deepcopy(layer).to(torch.bfloat16)
        cache = LayerCache()
        out = torch.cat([half(x[:, :8].bfloat16(), cache=cache)] +
                        [half(x[:, t:t + 1].bfloat16(), cache=cache) for t in range(8, 12)], dim=1)
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, ref) < 0.05
