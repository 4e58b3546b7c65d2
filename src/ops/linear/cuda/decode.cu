// hla — decode / multi-token step of the linear family on CUDA: the per-token recurrence of SPECS.md §1
// against state slots, updated in place.
//
// Memory bound: the fp32 state tile is read once and written once per call, whatever T is. One block
// per (sequence, value head, 32 value columns); lane = value column (a warp reads 128 contiguous bytes
// of a state row), warp w of WARPS holds the key rows [w·K/WARPS, (w+1)·K/WARPS) in registers.
// Reductions over keys (kᵀS, Sᵀq) go through shared memory across the warps.
//
// The grid is one dimension in memory order (column tile fastest, then value head, then sequence), so
// blocks that run together read and write neighbouring parts of the same state rows, and the state is
// loaded and stored with the streaming hint (ld/st.global.cs: it is touched once per call). H100,
// GDN B=64 H=16 K=V=128 in a CUDA graph, one call (session 6): 55.6 µs before; either change alone
// 59.5 µs (memory order) and 55.5 µs (hint); both 51.6 µs, and 51.4 µs with four states taken in
// turn (268 MB: no step finds the previous one's state in L2, as when other layers run in between).
//
// No allocation, no host synchronisation, no host-side table: the launch is all there is, so the
// step can be captured in a CUDA graph. state_indices is read on the device.
#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/common.cuh"
#include "ops/linear/problem.hpp"

namespace hla::linear::cuda {

struct DecodeParams : CellOptions {
    const void *q, *k, *v, *g, *beta, *A_log, *dt_bias, *indices;
    float* state;
    void* o;
    DType q_dtype, k_dtype, v_dtype, g_dtype, beta_dtype, o_dtype, idx_dtype;
    int64_t qs[3], ks[3], vs[3], gs[3], bs[3], os[3], idx_stride;
    int T, H, HV, G, V;
    Decay decay;
    bool delta;
};

constexpr int kDecodeCols = 32;
// Warps per block (key-row split). H100, GDN B=64 H=16 K=V=128 in a CUDA graph, one call (session 5):
// 4 warps 57.5 us (96 registers, 5 blocks = 20 warps per SM), 8 warps 55.7 us (64 registers, 32 warps
// per SM), 16 warps 60.1 us (the 16-way key reductions cost more than the extra warps gain).
constexpr int kDecodeWarps = 8;

// (64 registers a thread at K ≤ 128: four blocks, 32 warps, per SM; ≤ 85 at K = 256: three)
template <int K, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, (K / WARPS <= 16 ? 32 / WARPS : 24 / WARPS)) linear_recurrence_step_kernel(const DecodeParams p) {
    constexpr int KW = K / WARPS;  // key rows per warp
    static_assert(KW >= 4, "decode: at least 4 key rows per warp");
    __shared__ float qv[K], kv[K], dec[K];
    __shared__ float red[2][WARPS][kDecodeCols];
    __shared__ float norms[2];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int tiles = p.V / kDecodeCols;
    const int zc = blockIdx.x % tiles, nh = blockIdx.x / tiles, hv = nh % p.HV, n = nh / p.HV, h = hv / p.G;
    const int col = zc * kDecodeCols + lane;
    const int64_t slot = p.indices ? load_index(p.indices, p.idx_dtype, n * p.idx_stride) : n;
    if (slot < 0) return;  // the whole block agrees: a skipped sequence

    float* S = p.state + ((slot * p.HV + hv) * K + warp * KW) * int64_t(p.V) + col;
    float s[KW];
#pragma unroll
    for (int j = 0; j < KW; ++j) s[j] = __ldcs(S + int64_t(j) * p.V);

    for (int t = 0; t < p.T; ++t) {
        // ---- this token's q, k, decay, β ----
        for (int c = tid; c < K; c += WARPS * 32) {
            qv[c] = load_any(p.q, p.q_dtype, n * p.qs[0] + t * p.qs[1] + h * p.qs[2] + c);
            kv[c] = load_any(p.k, p.k_dtype, n * p.ks[0] + t * p.ks[1] + h * p.ks[2] + c);
            float gl = 0.f;
            switch (p.decay) {
                case Decay::None: break;
                case Decay::Fixed: gl = static_cast<const float*>(p.g)[hv]; break;
                case Decay::Scalar:
                case Decay::Vector: {
                    const int64_t gi = n * p.gs[0] + t * p.gs[1] + hv * p.gs[2] + (p.decay == Decay::Vector ? c : 0);
                    const float x = load_any(p.g, p.g_dtype, gi);
                    if (p.gate_act == GateActivation::None) {
                        gl = x;
                    } else {
                        const float bias = static_cast<const float*>(p.dt_bias)[p.decay == Decay::Vector ? hv * K + c : hv];
                        gl = gate_log_decay(p.gate_act, p.lower_bound, x + bias, static_cast<const float*>(p.A_log)[hv]);
                    }
                    break;
                }
            }
            dec[c] = __expf(gl);
        }
        const float vt = load_any(p.v, p.v_dtype, n * p.vs[0] + t * p.vs[1] + hv * p.vs[2] + col);
        float beta = 0.f;
        if (p.delta) beta = beta_value(p.beta_act, load_any(p.beta, p.beta_dtype, n * p.bs[0] + t * p.bs[1] + hv * p.bs[2]));
        __syncthreads();
        if (p.qk_l2norm && warp < 2) {
            const float* x = warp == 0 ? qv : kv;
            float ss = 0.f;
            for (int c = lane; c < K; c += 32) ss += x[c] * x[c];
            for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
            if (lane == 0) norms[warp] = rsqrtf(ss + float(kL2NormEps));
        }
        __syncthreads();
        const float fq = p.scale * (p.qk_l2norm ? norms[0] : 1.f);
        const float fk = p.qk_l2norm ? norms[1] : 1.f;

        // ---- S ← D S, then the update ----
        const float* kw = kv + warp * KW;
        const float* dw = dec + warp * KW;
        float u = vt;
        if (p.delta) {
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < KW; ++j) {
                s[j] *= dw[j];
                part += kw[j] * s[j];
            }
            red[0][warp][lane] = part;
            __syncthreads();
            float ks = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) ks += red[0][w][lane];
            u = beta * (vt - fk * ks);
        } else {
#pragma unroll
            for (int j = 0; j < KW; ++j) s[j] *= dw[j];
        }
        // ---- S ← S + k uᵀ; o = Sᵀ (s q) ----
        const float* qw = qv + warp * KW;
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < KW; ++j) {
            s[j] += fk * kw[j] * u;
            part += qw[j] * s[j];
        }
        red[1][warp][lane] = part;
        __syncthreads();
        if (warp == 0) {
            float o = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) o += red[1][w][lane];
            store_any(p.o, p.o_dtype, n * p.os[0] + t * p.os[1] + hv * p.os[2] + col, fq * o);
        }
        __syncthreads();  // qv/kv/dec/red are rewritten by the next token
    }
#pragma unroll
    for (int j = 0; j < KW; ++j) __stcs(S + int64_t(j) * p.V, s[j]);
}

template <int K>
static void launch_decode(const DecodeParams& dp, int64_t N, const char* op) {
    const int64_t blocks = N * dp.HV * (dp.V / kDecodeCols);
    HLA_CHECK(blocks < (int64_t(1) << 31), op, ": q: ", N, " sequences × ", dp.HV, " value heads × ", dp.V / kDecodeCols,
              " column tiles exceed the CUDA decode's 2^31 blocks");
    linear_recurrence_step_kernel<K, kDecodeWarps><<<unsigned(blocks), kDecodeWarps * 32, 0, launch_stream()>>>(dp);
    check_cuda(cudaGetLastError(), op, "linear_recurrence_step launch");
}

void decode(const DecodeProblem& p) {
    const LinearDecodeArgs& a = p.args;
    HLA_CHECK(p.K == 64 || p.K == 128 || p.K == 256, p.op, ": q: CUDA decode supports K in {64, 128, 256}, got K = ", p.K);
    HLA_CHECK(p.V % kDecodeCols == 0, p.op, ": v: CUDA decode needs V a multiple of 32, got V = ", p.V);
    if (p.N == 0 || p.T == 0) return;
    DecodeParams dp{};
    dp.q = a.q.data;
    dp.k = a.k.data;
    dp.v = a.v.data;
    dp.g = a.g.defined() ? a.g.data : nullptr;
    dp.beta = a.beta.defined() ? a.beta.data : nullptr;
    dp.A_log = a.A_log.defined() ? a.A_log.data : nullptr;
    dp.dt_bias = a.dt_bias.defined() ? a.dt_bias.data : nullptr;
    dp.indices = a.state_indices.defined() ? a.state_indices.data : nullptr;
    dp.state = static_cast<float*>(a.state.data);
    dp.o = a.o.data;
    dp.q_dtype = a.q.dtype;
    dp.k_dtype = a.k.dtype;
    dp.v_dtype = a.v.dtype;
    dp.g_dtype = a.g.defined() ? a.g.dtype : DType::F32;
    dp.beta_dtype = a.beta.defined() ? a.beta.dtype : DType::F32;
    dp.o_dtype = a.o.dtype;
    dp.idx_dtype = a.state_indices.defined() ? a.state_indices.dtype : DType::I32;
    dp.idx_stride = a.state_indices.defined() ? a.state_indices.stride[0] : 1;
    fill_strides(dp.qs, a.q);
    fill_strides(dp.ks, a.k);
    fill_strides(dp.vs, a.v);
    fill_strides(dp.gs, a.g);
    fill_strides(dp.bs, a.beta);
    fill_strides(dp.os, a.o);
    dp.T = int(p.T);
    dp.H = int(p.H);
    dp.HV = int(p.HV);
    dp.G = int(p.G);
    dp.V = int(p.V);
    static_cast<CellOptions&>(dp) = cell_options(p.cfg, p.scale);
    dp.decay = p.cfg.decay;
    dp.delta = p.cfg.update == Update::Delta;
    switch (p.K) {
        case 64: return launch_decode<64>(dp, p.N, p.op);
        case 128: return launch_decode<128>(dp, p.N, p.op);
        default: return launch_decode<256>(dp, p.N, p.op);
    }
}

}  // namespace hla::linear::cuda
