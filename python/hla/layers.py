"""Token-mixing layers of hybrid models, as nn.Modules over hla.ops (SPECS.md §4).

Each layer follows the Hugging Face implementation of its model and uses the checkpoint's parameter
names, so a layer's slice of a checkpoint loads with `load_state_dict` as is:

    GatedDeltaNet        Qwen3-Next linear attention  (`model.layers.N.linear_attn.*`)
    GatedAttention       Qwen3-Next full attention    (`model.layers.N.self_attn.*`)
    KimiDeltaAttention   Kimi Linear KDA              (`model.layers.N.self_attn.*` of KDA layers)
    LightningAttention   MiniMax-Text-01 / M1         (`model.layers.N.self_attn.*` of linear layers)

Generation: pass the same `LayerCache` to successive calls. The first call (prefill) fills it; later
calls continue from it, one token or several at a time. Linear layers keep a constant-size state
(the recurrent state [B, HV, K, V] fp32 and the short-convolution tails) and step it in place with
libhla's decode call when no gradient is needed; GatedAttention keeps a growing KV cache.

Padding: `attention_mask` [B, T] (1 = token, 0 = padding) zeroes padded inputs of the linear layers,
as Hugging Face does (exact for left padding); GatedAttention takes no padding mask (pack sequences or
run them one by one).

The projections, short convolutions and norms are ordinary torch modules here (they are not
attention math); the sequence mixing itself always runs in libhla.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

Tensor = torch.Tensor

__all__ = ["LayerCache", "GatedDeltaNet", "GatedAttention", "KimiDeltaAttention", "LightningAttention"]


class LayerCache:
    """Generation state of one layer.

    recurrent_state  [B, HV, K, V] fp32 (linear layers)
    conv_states      name -> the last W−1 inputs of a short convolution, [B, C, W−1]
    key, value       [B, capacity, HKV, D] preallocated KV cache (GatedAttention), first `seen_tokens` valid
    seen_tokens      tokens consumed so far (the position of the next token)
    """

    def __init__(self):
        self.recurrent_state: Optional[Tensor] = None
        self.conv_states: Dict[str, Tensor] = {}
        self.key: Optional[Tensor] = None
        self.value: Optional[Tensor] = None
        self.seen_tokens = 0

    def reorder(self, index: Tensor) -> None:
        """Selects / repeats batch rows (beam search): every tensor is indexed along dim 0."""
        if self.recurrent_state is not None:
            self.recurrent_state = self.recurrent_state.index_select(0, index)
        self.conv_states = {k: v.index_select(0, index) for k, v in self.conv_states.items()}
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


# ---- building blocks (Hugging Face semantics) -----------------------------------------------------

class RMSNorm(nn.Module):
    """weight · x / rms(x), computed in fp32 and cast back (Llama / Mixtral / MiniMax)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class OffsetRMSNorm(nn.Module):
    """(1 + weight) · x / rms(x) in fp32 (Gemma style; Qwen3-Next's q/k norms). weight starts at 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class RMSNormGated(nn.Module):
    """weight · rmsnorm(x) · act(gate), norm before gate (Qwen3-Next: SiLU; Kimi: sigmoid)."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps
        self.activation = activation

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h.to(dtype)
        g = gate.float()
        h = h * (F.silu(g) if self.activation == "silu" else torch.sigmoid(g))
        return h.to(dtype)


def _short_conv(x: Tensor, weight: Tensor, cache: Optional[LayerCache], name: str) -> Tensor:
    """Depthwise causal conv1d + SiLU over [B, T, C] with weight [C, 1, W]; the cache keeps the last
    W−1 inputs so a later call continues exactly (zeros before the first token, as HF pads)."""
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)
    prev = cache.conv_states.get(name) if cache is not None else None
    if prev is None:
        prev = xt.new_zeros(B, C, W - 1)
    full = torch.cat([prev, xt], dim=-1)
    if cache is not None:
        cache.conv_states[name] = full[:, :, full.shape[-1] - (W - 1):]
    y = F.conv1d(full, weight, groups=C)
    return F.silu(y).transpose(1, 2).to(x.dtype)


def _mask_padding(x: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    if attention_mask is None:
        return x
    return (x * attention_mask[:, -x.shape[1]:, None]).to(x.dtype)


def _wants_grad(module: nn.Module, *tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and (any(p.requires_grad for p in module.parameters())
                                        or any(t.requires_grad for t in tensors))


def _cfg(config, *names, default=None):
    for name in names:
        if isinstance(config, dict) and name in config:
            return config[name]
        if not isinstance(config, dict) and getattr(config, name, None) is not None:
            return getattr(config, name)
    return default


# ---- Gated DeltaNet (Qwen3-Next) ------------------------------------------------------------------

class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention layer: fused q/k/v/z and b/a projections laid out per key-head
    group, depthwise causal conv + SiLU over q‖k‖v, gated delta rule with in-kernel q/k L2 norm,
    β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias), gated RMSNorm with SiLU(z), out_proj."""

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_kernel_size: int = 4, rms_norm_eps: float = 1e-6, layer_idx: Optional[int] = None):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads={num_v_heads} must be a multiple of num_k_heads={num_k_heads}")
        self.hidden_size = hidden_size
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim, self.value_dim = head_k_dim * num_k_heads, head_v_dim * num_v_heads
        self.conv_kernel_size = conv_kernel_size
        self.layer_idx = layer_idx
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel_size, groups=self.conv_dim, bias=False,
                                padding=conv_kernel_size - 1)
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.empty(num_v_heads).uniform_(0, 16).log())
        self.norm = RMSNormGated(head_v_dim, eps=rms_norm_eps, activation="silu")
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @classmethod
    def from_config(cls, config, layer_idx: Optional[int] = None) -> "GatedDeltaNet":
        """From a transformers Qwen3NextConfig (or a dict with its field names)."""
        return cls(_cfg(config, "hidden_size"), _cfg(config, "linear_num_key_heads"),
                   _cfg(config, "linear_num_value_heads"), _cfg(config, "linear_key_head_dim"),
                   _cfg(config, "linear_value_head_dim"), _cfg(config, "linear_conv_kernel_dim", default=4),
                   _cfg(config, "rms_norm_eps", default=1e-6), layer_idx)

    def _split(self, qkvz: Tensor, ba: Tensor):
        B, T, _ = qkvz.shape
        G = self.num_v_heads // self.num_k_heads
        qkvz = qkvz.view(B, T, self.num_k_heads, 2 * self.head_k_dim + 2 * G * self.head_v_dim)
        q, k, v, z = torch.split(qkvz, [self.head_k_dim, self.head_k_dim, G * self.head_v_dim, G * self.head_v_dim],
                                 dim=3)
        b, a = torch.split(ba.view(B, T, self.num_k_heads, 2 * G), [G, G], dim=3)
        return (q, k, v.reshape(B, T, self.num_v_heads, self.head_v_dim),
                z.reshape(B, T, self.num_v_heads, self.head_v_dim), b.reshape(B, T, self.num_v_heads),
                a.reshape(B, T, self.num_v_heads))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        x = _mask_padding(hidden_states, attention_mask)
        B, T, _ = x.shape
        q, k, v, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        mixed = _short_conv(mixed, self.conv1d.weight, cache, "qkv")
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        state = cache.recurrent_state if cache is not None else None
        if state is not None and not _wants_grad(self, hidden_states):
            cfg = ops.make_config("scalar", "delta", None, True, "softplus_decay", None, "sigmoid")
            o = ops.decode(cfg, q, k, v, a, b, self.A_log.float(), self.dt_bias.float(), state)
        else:
            o, state = ops.chunk_gated_delta_rule(q, k, v, a, b, initial_state=state,
                                                  output_final_state=cache is not None,
                                                  use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                                  use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias)
        if cache is not None:
            cache.recurrent_state = state
            cache.seen_tokens += T
        o = self.norm(o, z)
        return self.out_proj(o.reshape(B, T, self.value_dim))


# ---- Kimi Delta Attention (Kimi Linear) -----------------------------------------------------------

class KimiDeltaAttention(nn.Module):
    """Kimi Linear's KDA layer: q/k/v projections each with its own short conv + SiLU, per-channel gate
    f = f_b(f_a(x)) with g = −exp(A_log)·softplus(f + dt_bias) (or lower_bound·sigmoid(exp(A_log)·(f +
    dt_bias)) when lower_bound is set), β = sigmoid(b_proj(x)), KDA with in-kernel q/k L2 norm, output
    RMSNorm gated by sigmoid(g_b(g_a(x))), o_proj. Parameter names and shapes of the released
    checkpoints (A_log [1, 1, H, 1], dt_bias [H·K])."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, conv_size: int = 4,
                 rms_norm_eps: float = 1e-5, lower_bound: Optional[float] = None, layer_idx: Optional[int] = None):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.lower_bound = lower_bound
        self.layer_idx = layer_idx
        proj = num_heads * head_dim
        self.projection_size = proj
        self.q_proj = nn.Linear(hidden_size, proj, bias=False)
        self.k_proj = nn.Linear(hidden_size, proj, bias=False)
        self.v_proj = nn.Linear(hidden_size, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj, proj, conv_size, groups=proj, bias=False, padding=conv_size - 1)
        self.k_conv1d = nn.Conv1d(proj, proj, conv_size, groups=proj, bias=False, padding=conv_size - 1)
        self.v_conv1d = nn.Conv1d(proj, proj, conv_size, groups=proj, bias=False, padding=conv_size - 1)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log().view(1, 1, num_heads, 1))
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, proj, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(proj))
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, proj, bias=False)
        self.o_norm = RMSNormGated(head_dim, eps=rms_norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(proj, hidden_size, bias=False)
        self._register_load_state_dict_pre_hook(self._from_transformers_layout)

    def _from_transformers_layout(self, state_dict, prefix, *args):
        """Also loads transformers' own KimiLinearDeltaAttention layout: one depthwise `conv1d` over
        the concatenated q, k, v channels, and the gate parameters under `forget_gate.`."""
        fused = state_dict.pop(prefix + "conv1d.weight", None)
        if fused is not None:
            for name, part in zip(("q_conv1d", "k_conv1d", "v_conv1d"), fused.chunk(3, dim=0)):
                state_dict[prefix + name + ".weight"] = part
        for name in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"):
            value = state_dict.pop(prefix + "forget_gate." + name, None)
            if value is not None:
                state_dict[prefix + name] = value

    @classmethod
    def from_config(cls, config, layer_idx: Optional[int] = None) -> "KimiDeltaAttention":
        """From a Kimi Linear config: its `linear_attn_config` dict (num_heads, head_dim,
        short_conv_kernel_size) or transformers' flattened linear_* fields."""
        lin = _cfg(config, "linear_attn_config", default={}) or {}
        num_heads = lin.get("num_heads") or _cfg(config, "linear_num_heads", "linear_num_key_heads")
        head_dim = lin.get("head_dim") or _cfg(config, "linear_head_dim", "linear_key_head_dim")
        conv = lin.get("short_conv_kernel_size") or _cfg(config, "linear_conv_kernel_dim", default=4)
        lower = lin.get("lower_bound") if lin.get("safe_gate") else None
        return cls(_cfg(config, "hidden_size"), num_heads, head_dim, conv, _cfg(config, "rms_norm_eps", default=1e-5),
                   lower, layer_idx)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        x = _mask_padding(hidden_states, attention_mask)
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q = _short_conv(self.q_proj(x), self.q_conv1d.weight, cache, "q").view(B, T, H, K)
        k = _short_conv(self.k_proj(x), self.k_conv1d.weight, cache, "k").view(B, T, H, K)
        v = _short_conv(self.v_proj(x), self.v_conv1d.weight, cache, "v").view(B, T, H, K)
        f = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K)
        beta = self.b_proj(x).float()
        A_log = self.A_log.reshape(H)
        dt_bias = self.dt_bias.view(H, K)
        state = cache.recurrent_state if cache is not None else None
        if state is not None and not _wants_grad(self, hidden_states):
            gate = "softplus_decay" if self.lower_bound is None else "bounded_sigmoid"
            cfg = ops.make_config("vector", "delta", None, True, gate, self.lower_bound, "sigmoid")
            o = ops.decode(cfg, q, k, v, f, beta, A_log.float(), dt_bias.float(), state)
        else:
            o, state = ops.chunk_kda(q, k, v, f, beta, initial_state=state, output_final_state=cache is not None,
                                     use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                     use_beta_sigmoid_in_kernel=True, lower_bound=self.lower_bound, A_log=A_log,
                                     dt_bias=dt_bias)
        if cache is not None:
            cache.recurrent_state = state
            cache.seen_tokens += T
        o = self.o_norm(o, self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K))
        return self.o_proj(o.reshape(B, T, H * K))


# ---- Lightning attention (MiniMax) ----------------------------------------------------------------

class LightningAttention(nn.Module):
    """MiniMax-Text-01 / M1 Lightning attention: SiLU(qkv_proj(x)) split per head into q, k, v; linear
    attention with the fixed per-head decay of layer `layer_idx` of `num_layers` and no query scaling;
    RMSNorm over all heads; times sigmoid(output_gate(x)); out_proj."""

    # Buffers of the Hugging Face module, derived from (layer_idx, num_layers): recomputed, not loaded.
    _DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, num_layers: int,
                 rms_norm_eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.qkv_proj = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.output_gate = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.norm = RMSNorm(num_heads * head_dim, eps=rms_norm_eps)
        self._register_load_state_dict_pre_hook(self._drop_derived_buffers)

    def _drop_derived_buffers(self, state_dict, prefix, *args):
        for name in self._DERIVED_BUFFERS:
            state_dict.pop(prefix + name, None)

    @classmethod
    def from_config(cls, config, layer_idx: int) -> "LightningAttention":
        """From a transformers MiniMaxConfig (or a dict with its field names)."""
        heads = _cfg(config, "num_attention_heads")
        head_dim = _cfg(config, "head_dim") or _cfg(config, "hidden_size") // heads
        return cls(_cfg(config, "hidden_size"), heads, head_dim, layer_idx, _cfg(config, "num_hidden_layers"),
                   _cfg(config, "rms_norm_eps", default=1e-5))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        qkv = _mask_padding(F.silu(self.qkv_proj(hidden_states)), attention_mask)
        q, k, v = torch.split(qkv.view(B, T, H, 3 * D), D, dim=3)
        state = cache.recurrent_state if cache is not None else None
        if state is not None and not _wants_grad(self, hidden_states):
            g = ops.lightning_attn_log_decay(H, self.layer_idx, self.num_layers, hidden_states.device)
            o = ops.decode(ops.make_config("fixed", "additive", 1.0), q, k, v, g, None, None, None, state)
        else:
            o, state = ops.chunk_lightning_attn(q, k, v, self.layer_idx, self.num_layers, scale=1.0,
                                                initial_state=state, output_final_state=cache is not None)
        if cache is not None:
            cache.recurrent_state = state
            cache.seen_tokens += T
        o = self.norm(o.reshape(B, T, H * D))
        o = torch.sigmoid(self.output_gate(hidden_states)) * o
        return self.out_proj(o)


# ---- Gated attention (Qwen3-Next) -----------------------------------------------------------------

def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class GatedAttention(nn.Module):
    """Qwen3-Next's full-attention layer: q_proj gives the query and a per-channel output gate,
    q/k RMSNorm with (1 + weight), partial RoPE (the first partial_rotary_factor of each head),
    GQA causal softmax attention in libhla with the sigmoid output gate applied in its epilogue,
    o_proj."""

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
                 rms_norm_eps: float = 1e-6, attention_bias: bool = False, rope_theta: float = 10000.0,
                 partial_rotary_factor: float = 0.25, layer_idx: Optional[int] = None):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"GatedAttention: num_attention_heads={num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={num_key_value_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_attention_heads, num_key_value_heads, head_dim
        self.layer_idx = layer_idx
        self.scaling = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim * 2, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=attention_bias)
        self.q_norm = OffsetRMSNorm(head_dim, eps=rms_norm_eps)
        self.k_norm = OffsetRMSNorm(head_dim, eps=rms_norm_eps)
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float()
                                         / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_config(cls, config, layer_idx: Optional[int] = None) -> "GatedAttention":
        """From a transformers Qwen3NextConfig (rope_theta / partial_rotary_factor read from
        rope_parameters when present)."""
        rope = _cfg(config, "rope_parameters", default=None) or {}
        theta = rope.get("rope_theta") or _cfg(config, "rope_theta", default=10000.0)
        partial = rope.get("partial_rotary_factor") or _cfg(config, "partial_rotary_factor", default=0.25)
        heads = _cfg(config, "num_attention_heads")
        head_dim = _cfg(config, "head_dim") or _cfg(config, "hidden_size") // heads
        return cls(_cfg(config, "hidden_size"), heads, _cfg(config, "num_key_value_heads"), head_dim,
                   _cfg(config, "rms_norm_eps", default=1e-6), bool(_cfg(config, "attention_bias", default=False)),
                   theta, partial, layer_idx)

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, H, D]; rotates the first rotary_dim channels (rotate-half convention)."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, :, None].to(x.dtype), emb.sin()[:, :, None].to(x.dtype)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("GatedAttention: attention_mask: padding masks are not supported; "
                             "run padded sequences separately")
        B, T, _ = hidden_states.shape
        H, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        past = cache.seen_tokens if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=hidden_states.device).expand(B, T)
        q, gate = torch.chunk(self.q_proj(hidden_states).view(B, T, H, 2 * D), 2, dim=-1)
        q = self._rope(self.q_norm(q), position_ids)
        k = self._rope(self.k_norm(self.k_proj(hidden_states).view(B, T, HKV, D)), position_ids)
        v = self.v_proj(hidden_states).view(B, T, HKV, D)
        if cache is None or past == 0 and _wants_grad(self, hidden_states):
            o, _ = ops.softmax_attention(q, k, v, causal=True, scale=self.scaling, gate=gate)
            if cache is not None:
                self._append(cache, k.detach(), v.detach())
        else:
            if _wants_grad(self, hidden_states):
                raise ValueError("GatedAttention: gradients through a filled KV cache are not supported; "
                                 "run the whole sequence without a cache to train")
            self._reserve(cache, B, past + T, k)
            seqlens = torch.full((B,), past, dtype=torch.int32, device=q.device)
            o = ops.flash_attn_with_kvcache(q, cache.key, cache.value, k, v, cache_seqlens=seqlens,
                                            softmax_scale=self.scaling, causal=True, gate=gate)
        if cache is not None:
            cache.seen_tokens += T
        return self.o_proj(o.reshape(B, T, H * D))

    @staticmethod
    def _reserve(cache: LayerCache, B: int, needed: int, like: Tensor) -> None:
        """Grows the preallocated KV cache (doubling) so it holds `needed` tokens."""
        have = 0 if cache.key is None else cache.key.shape[1]
        if have >= needed:
            return
        capacity = max(needed, 2 * have, 64)
        key = like.new_zeros(B, capacity, like.shape[2], like.shape[3])
        value = like.new_zeros(B, capacity, like.shape[2], like.shape[3])
        if cache.key is not None:
            key[:, :cache.seen_tokens] = cache.key[:, :cache.seen_tokens]
            value[:, :cache.seen_tokens] = cache.value[:, :cache.seen_tokens]
        cache.key, cache.value = key, value

    def _append(self, cache: LayerCache, k: Tensor, v: Tensor) -> None:
        B, T = k.shape[:2]
        self._reserve(cache, B, cache.seen_tokens + T, k)
        cache.key[:, cache.seen_tokens:cache.seen_tokens + T] = k
        cache.value[:, cache.seen_tokens:cache.seen_tokens + T] = v
