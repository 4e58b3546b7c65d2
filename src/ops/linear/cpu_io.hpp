// hla — CPU backends' input side: reading strided rows of any float dtype as fp32, and the
// per-token transforms (q/k L2 norm, scale, gate and β activations) that turn raw inputs into the
// recurrence's q̂, k̂, log decay and β. Shared by the chunked passes and the decode step.
#pragma once

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core/cpu_math.hpp"
#include "ops/linear/activations.hpp"
#include "ops/linear/problem.hpp"

namespace hla::linear::cpu {

inline void read_row(const TensorView& x, int64_t offset, int64_t n, float* out) {
    switch (x.dtype) {
        case DType::F32: { const float* p = x.ptr<float>() + offset; for (int64_t i = 0; i < n; ++i) out[i] = p[i]; break; }
        case DType::BF16: { const bf16* p = x.ptr<bf16>() + offset; for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]); break; }
        case DType::F16: { const f16* p = x.ptr<f16>() + offset; for (int64_t i = 0; i < n; ++i) out[i] = f16_to_float(p[i]); break; }
        default: for (int64_t i = 0; i < n; ++i) out[i] = float(load_as_double(x.data, x.dtype, offset + i)); break;
    }
}

inline void write_row(const TensorView& x, int64_t offset, const float* in, int64_t n) {
    switch (x.dtype) {
        case DType::F32: { float* p = x.ptr<float>() + offset; for (int64_t i = 0; i < n; ++i) p[i] = in[i]; break; }
        case DType::BF16: { bf16* p = x.ptr<bf16>() + offset; for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]); break; }
        default: for (int64_t i = 0; i < n; ++i) store_from_double(x.data, x.dtype, offset + i, in[i]); break;
    }
}

// write_row for outputs that are not read back soon: f32 rows on 64-byte boundaries go to memory with
// non-temporal stores, without first reading the lines in (a chunk's output rows, one page per token,
// are mostly not in cache). Call streaming_fence() before the outputs are handed over.
inline void write_row_streaming(const TensorView& x, int64_t offset, const float* in, int64_t n) {
#if defined(__AVX512F__)
    float* p = x.dtype == DType::F32 ? x.ptr<float>() + offset : nullptr;
    if (p && reinterpret_cast<uintptr_t>(p) % 64 == 0 && n % 16 == 0) {
        for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(p + i, _mm512_loadu_ps(in + i));
        return;
    }
#endif
    write_row(x, offset, in, n);
}

inline void streaming_fence() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

// Asks for the row of n elements at `offset` to be brought into L2, to be read one chunk later.
// Issued right after a row on the same page was read: on the Zen 4 host, prefetches to pages not in
// the L1 TLB seem to be dropped (a burst over a chunk's 192 rows, one page each, left the next copy
// as slow as without it; a prefetch right after a load from the same page made it 2-3x faster).
// Only reads: prefetching the output rows for writing made the forward slower.
// With `touch`, for a row whose page was not just read, its first line is loaded for real first (the
// load brings the page into the TLB, the prefetches of the other lines then go through).
inline void prefetch_row(const TensorView& x, int64_t offset, int64_t n, bool touch = false) {
    const size_t size = dtype_size(x.dtype);
    const char* p = static_cast<const char*>(x.data) + size_t(offset) * size;
    size_t byte = 0;
    if (touch) {
        (void)*static_cast<const volatile char*>(p);
        byte = 64 - reinterpret_cast<uintptr_t>(p) % 64;
    }
    for (; byte < size_t(n) * size; byte += 64) __builtin_prefetch(p + byte, 0, 2);
}

inline float read_scalar(const TensorView& x, int64_t offset) {
    float f;
    read_row(x, offset, 1, &f);
    return f;
}

// The inputs of one call, whichever API it came through (forward/backward Problem or decode).
struct InputViews {
    LinearConfig cfg;
    float scale = 1;
    int64_t G = 1, K = 0, V = 0;
    TensorView q, k, v, g, beta, A_log, dt_bias;

    bool vector_decay() const { return cfg.decay == Decay::Vector; }
    bool delta() const { return cfg.update == Update::Delta; }
};

inline InputViews input_views(const Problem& p) {
    const auto& a = p.args;
    return {p.cfg, float(p.scale), p.G, p.K, p.V, a.q, a.k, a.v, a.g, a.beta, a.A_log, a.dt_bias};
}

inline InputViews input_views(const DecodeProblem& p) {
    const auto& a = p.args;
    return {p.cfg, float(p.scale), p.G, p.K, p.V, a.q, a.k, a.v, a.g, a.beta, a.A_log, a.dt_bias};
}

// l2norm_denominator's formula with a vectorised sum of squares: the plain loop is one dependent add
// per element (the compiler may not reassociate it) and was most of the chunk loading time.
inline void l2_normalize(float* x, int64_t n) {
    const float inv = 1.0f / std::sqrt(hla::cpu::dot(x, x, n) + float(kL2NormEps));
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// One token of value head hv at (batch row b, token t): q̂·scale [K], k̂ [K], v [V], log decay
// ([K] for vector decay, else [1]; 0 without decay), β ([1], 1 for additive). `gate_in` (same size as
// log_decay) receives the activation's input g + dt_bias when a gate activation is set.
inline void load_token(const InputViews& in, int64_t b, int64_t t, int64_t hv, float* q, float* k, float* v,
                       float* log_decay, float* beta, float* gate_in = nullptr) {
    const int64_t h = hv / in.G;
    if (q) {
        read_row(in.q, token_offset(in.q, b, t, h), in.K, q);
        if (in.cfg.qk_l2norm) l2_normalize(q, in.K);
        for (int64_t c = 0; c < in.K; ++c) q[c] *= in.scale;
    }
    if (k) {
        read_row(in.k, token_offset(in.k, b, t, h), in.K, k);
        if (in.cfg.qk_l2norm) l2_normalize(k, in.K);
    }
    if (v) read_row(in.v, token_offset(in.v, b, t, hv), in.V, v);
    switch (in.cfg.decay) {
        case Decay::None: log_decay[0] = 0; break;
        case Decay::Fixed: log_decay[0] = read_scalar(in.g, hv * in.g.stride[0]); break;
        case Decay::Scalar: {
            float x = read_scalar(in.g, token_offset(in.g, b, t, hv));
            if (in.cfg.gate_activation != GateActivation::None) {
                x += read_scalar(in.dt_bias, hv * in.dt_bias.stride[0]);
                if (gate_in) gate_in[0] = x;
                x = gate_forward<float>(in.cfg, x, read_scalar(in.A_log, hv * in.A_log.stride[0]));
            }
            log_decay[0] = x;
            break;
        }
        case Decay::Vector: {
            read_row(in.g, token_offset(in.g, b, t, hv), in.K, log_decay);
            if (in.cfg.gate_activation != GateActivation::None) {
                const float a_log = read_scalar(in.A_log, hv * in.A_log.stride[0]);
                for (int64_t c = 0; c < in.K; ++c) {
                    const float x = log_decay[c] + read_scalar(in.dt_bias, hv * in.dt_bias.stride[0] + c);
                    if (gate_in) gate_in[c] = x;
                    log_decay[c] = gate_forward<float>(in.cfg, x, a_log);
                }
            }
            break;
        }
    }
    if (in.delta()) {
        const float raw = read_scalar(in.beta, token_offset(in.beta, b, t, hv));
        beta[0] = beta_forward<float>(in.cfg, raw);
    } else {
        beta[0] = 1;
    }
}

}  // namespace hla::linear::cpu
