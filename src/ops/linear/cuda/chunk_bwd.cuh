// hla — chunked backward of the linear family on CUDA (SPECS.md §1, "Chunked backward").
//
// Three stages, each parallel over what is independent (backward.cu runs them):
//   1. states     the forward's prepare and scan (chunk_fwd.cuh) recompute the state at the start of
//                 every 64-token chunk (in the scan's operand dtype), parallel over (sequence, value
//                 head, V-tile), sequential over chunks; prepare's per-chunk operands are kept.
//   2. dS scan    ∂loss/∂S at the end of every chunk, last chunk first (chunk_bwd_scan.cuh), parallel
//                 over (sequence, value head, V-tile): dS ← diag(γ_C) dS + Qgᵀ dO − Wᵀ dX with
//                 dX = Pᵀ dO + Kd dS; the last dS is dh0.
//   3. per chunk  every gradient of one chunk from its start state S0 and end gradient dS_C, one work
//                 item per (chunk, query/key head), all chunks in parallel: on bf16 tensor cores
//                 (chunk_bwd_mma.cuh) for bf16 inputs with a decay of one number per token, else the
//                 fp32 kernel of this file (vector decay, fp16 and fp32 inputs). The item walks
//                 the G = HV / H value heads of its group, so dq and dk (which the group shares) add up
//                 in the item's scratch without atomics, then pass through the scale and the in-kernel
//                 L2 norm backward. Per-head parameter gradients (fixed γ, A_log, dt_bias) are summed
//                 per chunk in the block and added into fp64 accumulators with one atomic per chunk
//                 (and channel), written by a small second kernel.
//
// This file's per-chunk math is the CPU backend's (cpu.cpp, cpu_chunk.cpp; docs/design.md), in fp32 with
// block-wide loops over a per-block global-memory scratch (a grid of resident blocks takes the items
// in turn), inputs of any dtype read element by element. It keeps the CPU backend's numerics
// (cpu_chunk.hpp): no exp(b) or exp(−b) over a chunk; vector-decay products factored around the token
// before each 16-row block with both factors ≤ 1, and inside a diagonal block the products of
// per-token decays; every exponent a same-sign sum of gates; the exact scalar-decay dg from the terms
// that straddle each token.
#pragma once

#include <algorithm>
#include <vector>

#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/common.cuh"
#include "ops/linear/cuda/fwd_params.cuh"
#include "ops/linear/problem.hpp"

namespace hla::linear::cuda {

namespace bwd {

constexpr int kC = 64;      // tokens per chunk (and the leading dimension of the C × C matrices)
constexpr int kBlk = 16;    // row block of the factored vector-decay products
constexpr int kThreads = 256;

struct Params : CellOptions {
    // inputs
    const void *q, *k, *v, *g, *beta, *A_log, *dt_bias, *d_o;
    DType q_dt, k_dt, v_dt, g_dt, beta_dt, do_dt;
    int64_t qs[3], ks[3], vs[3], gs[3], bs[3], dos[3];
    int64_t alog_s, dtb_s;
    // stages 1 and 2: per (chunk, value head) [K, V] in st_dt, the state at the chunk's start and
    // ∂loss/∂(state at its end)
    const void *states, *dstates;
    DType st_dt;
    // stage 1's prepare operands U, W [chunk, HV, 64, V or K] (read by the tensor-core stage 3)
    const void *U, *Wm;
    const void *Kd, *P;  // stage 1's K̄ [chunk, HV, 64, K] and P [chunk, HV, 64, 64] (vector decay on tensor cores)
    const float* Tinv;  // delta rule: prepare's T = (I + A)^{-1} [chunk, HV, 64, 64] fp32
    const float* Dm;    // delta rule, vector decay: prepare's decayed key products D [chunk, HV, 64, 64] fp32
    // Vector decay on tensor cores: what the first per-chunk kernel hands the second, per (chunk, value
    // head) (chunk_bwd_mma.cuh): fp32 the partial dβ [64] (delta), Σ_e S0 ⊙ dS_C per key row [K] and
    // dP's diagonal [64]; bf16 dO S0ᵀ, Z S0ᵀ (delta), X dS_Cᵀ [64, K] (each scaled by a decay and added
    // once to dq, dk and the fp32 sums behind dg and dβ: an error of the order of the bf16 operands'
    // own rounding in the products that formed them, for half the bytes of fp32. H100, B=4 T=4096:
    // KDA forward + backward 3.15-3.17 -> 3.04-3.08 ms; the vector cells' worst gradient error / bound
    // in the backward tests 0.348 -> 0.362, dg's unchanged; `hla bench` fwdbwd at T=4096 against fp64
    // unchanged, KDA 3.11e-3, GLA 2.79e-3); and, as the bf16 operands
    // the second kernel multiplies with (so already rounded as it would round them), dP strictly lower
    // and dD (delta) [64, 64].
    float *v_db, *v_sd, *v_dpd;
    __nv_bfloat16 *v_dqg, *v_m, *v_dkb, *v_dp, *v_dd;
    // outputs (null when not requested)
    void *dq, *dk, *dv;
    float *dg, *dbeta;
    DType dq_dt, dk_dt, dv_dt;
    int64_t dqs[3], dks[3], dvs[3], dgs[3], dbs[3];
    // sizes and options
    int B, T, H, HV, G, K, V, W;  // W: log decays per token (K for vector decay, else 1)
    Decay decay;
    // work and workspace
    const ChunkInfo* chunks;
    int n_chunks;
    float* scratch;       // per resident block: scratch_floats
    int64_t scratch_floats;
    double* params_acc;   // [HV] fixed γ, [HV] A_log, [HV, W] dt_bias
};

// The per-block scratch: one chunk's transformed inputs and every intermediate of its backward.
struct Ws {
    float *q, *k, *v, *g, *b, *beta, *gate_in, *dO;
    float *ea, *eb, *ebar, *kg, *qg, *kbar, *dqg, *dkbar, *dkg, *tmp1, *tmp2, *db, *blk_x, *blk_out, *blk_y2;
    float *y, *x, *dx, *z, *dy;
    float *d, *a, *p, *gam, *dp, *da, *f;
    float *S, *dS, *dqa, *dka;
    float *diag, *u, *w, *dbeta, *dg, *rowred, *c_last, *red;
};

// Lays the scratch out (or, with base == nullptr, counts it).
__host__ __device__ inline int64_t layout(float* base, int K, int V, int W, Ws* ws) {
    int64_t at = 0;
    auto take = [&](float*& ptr, int64_t n) {
        if (base) ptr = base + at;
        at += (n + 31) / 32 * 32;
    };
    Ws dummy;
    Ws& w = ws ? *ws : dummy;
    const int64_t CK = int64_t(kC) * K, CV = int64_t(kC) * V, CW = int64_t(kC) * W, CC = int64_t(kC) * kC;
    take(w.q, CK); take(w.k, CK); take(w.v, CV); take(w.g, CW); take(w.b, CW); take(w.beta, kC); take(w.gate_in, CW);
    take(w.dO, CV);
    take(w.ea, CK); take(w.eb, CW); take(w.ebar, CW);
    take(w.kg, CK); take(w.qg, CK); take(w.kbar, CK); take(w.dqg, CK); take(w.dkbar, CK); take(w.dkg, CK);
    take(w.tmp1, CK); take(w.tmp2, CK); take(w.db, CK); take(w.blk_out, CK); take(w.blk_y2, CK);
    take(w.blk_x, int64_t(kBlk) * K);
    take(w.y, CV); take(w.x, CV); take(w.dx, CV); take(w.z, CV); take(w.dy, CV);
    take(w.d, CC); take(w.a, CC); take(w.p, CC); take(w.gam, CC); take(w.dp, CC); take(w.da, CC); take(w.f, CC);
    take(w.S, int64_t(K) * V);
    take(w.dS, int64_t(K) * V);
    take(w.dqa, CK); take(w.dka, CK);
    take(w.diag, kC); take(w.u, kC); take(w.w, kC); take(w.dbeta, kC);
    take(w.dg, CW);
    take(w.rowred, K);
    take(w.c_last, 1);
    take(w.red, 2 * W + 1);
    return at;
}

// ---- block-wide building blocks (every one ends with a barrier) ----------------------------------

// C[r, c] = alpha Σ_k A(r, k) B(k, c) (+ beta C[r, c]); A(r, k) = A[r·ars + k·acs], B likewise.
// With beta = 0, C is not read (it may hold NaN).
__device__ inline void gemm(int M, int N, int Kd, float alpha, const float* A, int ars, int acs, const float* Bm,
                            int brs, int bcs, float beta, float* C, int ldc) {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
        const int r = idx / N, c = idx % N;
        const float* a = A + int64_t(r) * ars;
        const float* bp = Bm + int64_t(c) * bcs;
        float s = 0.f;
        for (int kk = 0; kk < Kd; ++kk) s += a[int64_t(kk) * acs] * bp[int64_t(kk) * brs];
        float* out = C + int64_t(r) * ldc + c;
        *out = beta == 0.f ? alpha * s : beta * *out + alpha * s;
    }
    __syncthreads();
}

// (I + A) X = X in place, A strictly lower triangular (ld kC), X [L, N]: one thread per column.
__device__ inline void solve_lower(int L, int N, const float* A, float* X) {
    for (int e = threadIdx.x; e < N; e += blockDim.x)
        for (int i = 1; i < L; ++i) {
            float s = X[i * N + e];
            for (int j = 0; j < i; ++j) s -= A[i * kC + j] * X[j * N + e];
            X[i * N + e] = s;
        }
    __syncthreads();
}

// (I + A)ᵀ Z = Z in place.
__device__ inline void solve_lower_t(int L, int N, const float* A, float* Z) {
    for (int e = threadIdx.x; e < N; e += blockDim.x)
        for (int j = L - 2; j >= 0; --j) {
            float s = Z[j * N + e];
            for (int i = j + 1; i < L; ++i) s -= A[i * kC + j] * Z[i * N + e];
            Z[j * N + e] = s;
        }
    __syncthreads();
}

// out = x ⊙ f, f [L, K] (vector) or [L] broadcast over the row.
template <bool kVec>
__device__ inline void scale_by(const float* x, const float* f, int L, int K, float* out) {
    for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) out[idx] = x[idx] * (kVec ? f[idx] : f[idx / K]);
    __syncthreads();
}

// db += sign · x ⊙ dx (vector: per element; scalar: the row sums into db[i]).
template <bool kVec>
__device__ inline void add_db(float* db, const float* x, const float* dx, int L, int K, float sign) {
    if constexpr (kVec) {
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) db[idx] += sign * x[idx] * dx[idx];
    } else {
        for (int i = threadIdx.x; i < L; i += blockDim.x) {
            float s = 0.f;
            for (int c = 0; c < K; ++c) s += x[i * K + c] * dx[i * K + c];
            db[i] += sign * s;
        }
    }
    __syncthreads();
}

// E ← mask ⊙ Γ ⊙ E over [L, L] (diag: j ≤ i kept, else j < i), Γ_ij = exp(Σ_{j<t≤i} g_t).
__device__ inline void mask_scale(float* E, const float* gam, int L, bool diag) {
    for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
        const int i = idx / L, j = idx % L;
        const bool keep = diag ? j <= i : j < i;
        E[i * kC + j] = keep ? E[i * kC + j] * gam[i * kC + j] : 0.f;
    }
    __syncthreads();
}

// ---- decayed products (cpu_chunk.cpp, "decayed products") -----------------------------------------
// E_ij = ⟨x_i, y_j⟩_b on the lower triangle; apply: out_i += Σ_j E_ij y_j ⊙ e_ij; apply_t:
// out_j += Σ_i E_ij x_i ⊙ e_ij, e_ij = exp(b_i − b_j).

template <bool kVec>
struct Decayed;

template <>
struct Decayed<false> {
    static __device__ void scores(const Ws& w, const float* x, const float* y, int L, int K, bool diag, float* E) {
        gemm(L, L, K, 1.f, x, K, 1, y, 1, K, 0.f, E, kC);
        mask_scale(E, w.gam, L, diag);
    }
    // E decayed and zero above the diagonal: plain products.
    static __device__ void apply(const Ws&, const float* E, const float* y, int L, int K, float* out) {
        gemm(L, K, L, 1.f, E, kC, 1, y, K, 1, 1.f, out, K);
    }
    static __device__ void apply_t(const Ws&, const float* E, const float* x, int L, int K, float* out) {
        gemm(L, K, L, 1.f, E, 1, kC, x, K, 1, 1.f, out, K);
    }
    static __device__ void prepare_grad(const Ws& w, float* dE, int L) { mask_scale(dE, w.gam, L, false); }
};

template <>
struct Decayed<true> {
    // dst[i − i0] = src_i ⊙ exp(Σ_{i0≤t≤i} g_t), i ∈ [i0, i1)  (src null: the factor alone)
    static __device__ void rows_after(const Ws& w, const float* src, int K, int i0, int i1, float* dst) {
        for (int c = threadIdx.x; c < K; c += blockDim.x) {
            float acc = 0.f;
            for (int i = i0; i < i1; ++i) {
                acc += w.g[i * K + c];
                dst[(i - i0) * K + c] = expf(acc) * (src ? src[i * K + c] : 1.f);
            }
        }
    }
    // dst[j] = src_j ⊙ exp(Σ_{j<t≤r} g_t), j ∈ [0, r]
    static __device__ void rows_before(const Ws& w, const float* src, int K, int r, float* dst) {
        for (int c = threadIdx.x; c < K; c += blockDim.x) {
            float acc = 0.f;
            for (int j = r; j >= 0; --j) {
                dst[j * K + c] = expf(acc) * (src ? src[j * K + c] : 1.f);
                acc += w.g[j * K + c];
            }
        }
    }

    static __device__ void scores(const Ws& w, const float* x, const float* y, int L, int K, bool diag, float* E) {
        // diagonal blocks: one thread per pair, e = Π_{j<t≤i} a_t (≤ 15 factors ≤ 1)
        for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
            const int i = idx / L, j = idx % L;
            float s = 0.f;
            if (i / kBlk == j / kBlk && (diag ? j <= i : j < i)) {
                for (int c = 0; c < K; ++c) {
                    float e = 1.f;
                    for (int t = j + 1; t <= i; ++t) e *= w.ea[t * K + c];
                    s += x[i * K + c] * y[j * K + c] * e;
                }
            }
            E[i * kC + j] = s;  // off-diagonal blocks below are overwritten next
        }
        __syncthreads();
        for (int i0 = kBlk; i0 < L; i0 += kBlk) {
            const int i1 = min(L, i0 + kBlk);
            rows_after(w, x, K, i0, i1, w.blk_x);          // x_I ⊙ exp(b_I − b_r), r = i0 − 1
            rows_before(w, y, K, i0 - 1, w.blk_out);       // y_J ⊙ exp(b_r − b_J)
            __syncthreads();
            gemm(i1 - i0, i0, K, 1.f, w.blk_x, K, 1, w.blk_out, 1, K, 0.f, E + i0 * kC, kC);
        }
    }

    static __device__ void apply(const Ws& w, const float* E, const float* y, int L, int K, float* out) {
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) {
            const int i = idx / K, c = idx % K, i0 = i / kBlk * kBlk;
            float e = 1.f, s = 0.f;
            for (int j = i; j >= i0; --j) {
                s += E[i * kC + j] * y[j * K + c] * e;  // E is zero on and above the diagonal where excluded
                e *= w.ea[j * K + c];
            }
            out[idx] += s;
        }
        __syncthreads();
        for (int i0 = kBlk; i0 < L; i0 += kBlk) {
            const int i1 = min(L, i0 + kBlk);
            rows_before(w, y, K, i0 - 1, w.blk_out);        // y_J ⊙ exp(b_r − b_J)
            rows_after(w, nullptr, K, i0, i1, w.blk_y2);    // exp(b_I − b_r)
            __syncthreads();
            gemm(i1 - i0, K, i0, 1.f, E + i0 * kC, kC, 1, w.blk_out, K, 1, 0.f, w.blk_x, K);
            for (int t = threadIdx.x; t < (i1 - i0) * K; t += blockDim.x) out[i0 * K + t] += w.blk_x[t] * w.blk_y2[t];
            __syncthreads();
        }
    }

    static __device__ void apply_t(const Ws& w, const float* E, const float* x, int L, int K, float* out) {
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) {
            const int j = idx / K, c = idx % K, i1 = min(L, j / kBlk * kBlk + kBlk);
            float e = 1.f, s = 0.f;
            for (int i = j; i < i1; ++i) {
                if (i > j) e *= w.ea[i * K + c];
                s += E[i * kC + j] * x[i * K + c] * e;
            }
            out[idx] += s;
        }
        __syncthreads();
        for (int i0 = kBlk; i0 < L; i0 += kBlk) {
            const int i1 = min(L, i0 + kBlk);
            rows_after(w, x, K, i0, i1, w.blk_x);           // x_I ⊙ exp(b_I − b_r)
            rows_before(w, nullptr, K, i0 - 1, w.blk_y2);   // exp(b_r − b_J)
            __syncthreads();
            gemm(i0, K, i1 - i0, 1.f, E + i0 * kC, 1, kC, w.blk_x, K, 1, 0.f, w.blk_out, K);
            for (int t = threadIdx.x; t < i0 * K; t += blockDim.x) out[t] += w.blk_out[t] * w.blk_y2[t];
            __syncthreads();
        }
    }

    static __device__ void prepare_grad(const Ws&, float* dE, int L) {
        for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
            const int i = idx / L, j = idx % L;
            if (j >= i) dE[i * kC + j] = 0.f;
        }
        __syncthreads();
    }
};

// ---- one chunk --------------------------------------------------------------------------------

// Decay factors, K̄, Qγ and P; for the delta rule Kγ, Y, D, A and X; else X = V.
template <bool kVec, bool kDelta>
__device__ void chunk_common(const Ws& w, const float* S0, int L, int K, int V) {
    constexpr int one = 1;
    const int W = kVec ? K : one;
    if constexpr (kVec) {
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) w.ea[idx] = expf(w.g[idx]);
    } else {
        for (int i = threadIdx.x; i < L; i += blockDim.x) {
            float acc = 0.f;
            for (int j = i; j >= 0; --j) {
                w.gam[i * kC + j] = expf(acc);
                acc += w.g[j];
            }
        }
    }
    for (int idx = threadIdx.x; idx < L * W; idx += blockDim.x) w.eb[idx] = expf(w.b[idx]);
    for (int ch = threadIdx.x; ch < W; ch += blockDim.x) {
        float acc = 0.f;
        w.ebar[(L - 1) * W + ch] = 1.f;
        for (int j = L - 2; j >= 0; --j) {
            acc += w.g[(j + 1) * W + ch];
            w.ebar[j * W + ch] = expf(acc);
        }
    }
    __syncthreads();
    scale_by<kVec>(w.k, w.ebar, L, K, w.kbar);
    scale_by<kVec>(w.q, w.eb, L, K, w.qg);
    Decayed<kVec>::scores(w, w.q, w.k, L, K, true, w.p);
    if constexpr (kDelta) {
        scale_by<kVec>(w.k, w.eb, L, K, w.kg);
        // Y = V − Kγ S0
        gemm(L, V, K, -1.f, w.kg, K, 1, S0, V, 1, 0.f, w.y, V);
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) w.y[idx] += w.v[idx];
        Decayed<kVec>::scores(w, w.k, w.k, L, K, false, w.d);
        for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
            const int i = idx / L, j = idx % L;
            w.a[i * kC + j] = j < i ? w.beta[i] * w.d[i * kC + j] : 0.f;
        }
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) w.x[idx] = w.beta[idx / V] * w.y[idx];
        __syncthreads();
        solve_lower(L, V, w.a, w.x);
    } else {
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) w.x[idx] = w.v[idx];
        __syncthreads();
    }
}

// Gradients of one chunk from its start state S0, w.dO and w.dS = ∂loss/∂(state at the chunk's end)
// (read only: ∂/∂S0 is the dS scan's). Adds into dq, dk ([L, K], row stride K); leaves dv in w.dy
// (delta) or w.dx (additive), dβ in w.dbeta, dg in w.dg.
template <bool kVec, bool kDelta>
__device__ void chunk_backward(const Ws& w, const float* S0, int L, int K, int V, float* dq, float* dk) {
    const int W = kVec ? K : 1;
    chunk_common<kVec, kDelta>(w, S0, L, K, V);
    const float* dS = w.dS;
    for (int idx = threadIdx.x; idx < L * W; idx += blockDim.x) w.db[idx] = 0.f;
    if constexpr (!kVec) {
        // the exact scalar dg's terms (cpu_chunk.cpp, ScalarDgTerms)
        for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) w.f[(idx / L) * kC + idx % L] = 0.f;
        for (int i = threadIdx.x; i < L; i += blockDim.x) w.u[i] = w.w[i] = 0.f;
    }
    __syncthreads();

    // dX = Pᵀ dO + K̄ dS_C
    gemm(L, V, L, 1.f, w.p, 1, kC, w.dO, V, 1, 0.f, w.dx, V);
    gemm(L, V, K, 1.f, w.kbar, K, 1, dS, V, 1, 1.f, w.dx, V);
    // dP = dO Xᵀ; dQγ = dO S0ᵀ; dK̄ = X dS_Cᵀ
    gemm(L, L, V, 1.f, w.dO, V, 1, w.x, 1, V, 0.f, w.dp, kC);
    gemm(L, K, V, 1.f, w.dO, V, 1, S0, 1, V, 0.f, w.dqg, K);
    gemm(L, K, V, 1.f, w.x, V, 1, dS, 1, V, 0.f, w.dkbar, K);

    // the state's decay over the chunk, S_C = diag(γ_last) S0 + …: ∂b_last += γ_last ⊙ rowsum(S0 ⊙ dS_C)
    const float* eb_last = w.eb + (L - 1) * W;
    float* db_last = w.db + (L - 1) * W;
    for (int r = threadIdx.x; r < K; r += blockDim.x) {
        float s = 0.f;
        for (int e = 0; e < V; ++e) s += S0[r * V + e] * dS[r * V + e];
        const float f = kVec ? eb_last[r] : eb_last[0];
        if constexpr (kVec) db_last[r] += f * s;
        else w.rowred[r] = f * s;
    }
    __syncthreads();
    if constexpr (!kVec) {
        if (threadIdx.x == 0) {
            float s = 0.f;
            for (int r = 0; r < K; ++r) s += w.rowred[r];
            w.c_last[0] = s;
        }
    }

    if constexpr (kDelta) {
        // (I + A)ᵀ Z = dX
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) w.z[idx] = w.dx[idx];
        __syncthreads();
        solve_lower_t(L, V, w.a, w.z);
        // dA = −Z Xᵀ (strict lower part); dβ_i = ⟨Z_i, Y_i⟩ + Σ_j dA_ij D_ij; dD = diag(β) dA; dY = diag(β) Z
        gemm(L, L, V, -1.f, w.z, V, 1, w.x, 1, V, 0.f, w.da, kC);
        for (int i = threadIdx.x; i < L; i += blockDim.x) {
            float s = 0.f;
            for (int e = 0; e < V; ++e) s += w.z[i * V + e] * w.y[i * V + e];
            for (int j = 0; j < i; ++j) s += w.da[i * kC + j] * w.d[i * kC + j];
            w.dbeta[i] = s;
            for (int j = 0; j < i; ++j) w.da[i * kC + j] *= w.beta[i];
        }
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) w.dy[idx] = w.beta[idx / V] * w.z[idx];
        __syncthreads();
        // Y = V − Kγ S0: dKγ = −dY S0ᵀ
        gemm(L, K, V, -1.f, w.dy, V, 1, S0, 1, V, 0.f, w.dkg, K);
        // D = ⟨k, k⟩_b (strict)
        if constexpr (!kVec) {
            for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
                const int i = idx / L, j = idx % L;
                if (j < i) w.f[i * kC + j] += w.da[i * kC + j] * w.d[i * kC + j];
            }
            __syncthreads();
        }
        Decayed<kVec>::prepare_grad(w, w.da, L);
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) w.tmp1[idx] = w.tmp2[idx] = 0.f;
        __syncthreads();
        Decayed<kVec>::apply(w, w.da, w.k, L, K, w.tmp1);
        Decayed<kVec>::apply_t(w, w.da, w.k, L, K, w.tmp2);
        if constexpr (kVec) {
            add_db<true>(w.db, w.k, w.tmp1, L, K, +1.f);
            add_db<true>(w.db, w.k, w.tmp2, L, K, -1.f);
        }
        // dk += both sides of D, and Kγ = K ⊙ γ
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x)
            dk[idx] += w.tmp1[idx] + w.tmp2[idx] + w.dkg[idx] * (kVec ? w.eb[idx] : w.eb[idx / K]);
        __syncthreads();
        add_db<kVec>(kVec ? w.db : w.u, w.kg, w.dkg, L, K, +1.f);
    } else {
        for (int i = threadIdx.x; i < L; i += blockDim.x) w.dbeta[i] = 0.f;
        __syncthreads();
    }

    // P = ⟨q, k⟩_b. Its diagonal's two contributions to ∂b_i cancel exactly: kept out of the decayed
    // products (and of dg).
    for (int i = threadIdx.x; i < L; i += blockDim.x) w.diag[i] = w.dp[i * kC + i];
    if constexpr (!kVec) {
        for (int idx = threadIdx.x; idx < L * L; idx += blockDim.x) {
            const int i = idx / L, j = idx % L;
            if (j < i) w.f[i * kC + j] += w.dp[i * kC + j] * w.p[i * kC + j];
        }
    }
    __syncthreads();
    Decayed<kVec>::prepare_grad(w, w.dp, L);
    for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) w.tmp1[idx] = w.tmp2[idx] = 0.f;
    __syncthreads();
    Decayed<kVec>::apply(w, w.dp, w.k, L, K, w.tmp1);
    Decayed<kVec>::apply_t(w, w.dp, w.q, L, K, w.tmp2);
    if constexpr (kVec) {
        add_db<true>(w.db, w.q, w.tmp1, L, K, +1.f);
        add_db<true>(w.db, w.k, w.tmp2, L, K, -1.f);
    }
    // dq: the scores, Qγ = Q ⊙ γ; dk: the scores, K̄ = K ⊙ exp(b_last − b)
    for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) {
        const int i = idx / K;
        const float dpii = w.diag[i];
        dq[idx] += w.tmp1[idx] + dpii * w.k[idx] + w.dqg[idx] * (kVec ? w.eb[idx] : w.eb[i]);
        dk[idx] += w.tmp2[idx] + dpii * w.q[idx] + w.dkbar[idx] * (kVec ? w.ebar[idx] : w.ebar[i]);
    }
    __syncthreads();
    add_db<kVec>(kVec ? w.db : w.u, w.qg, w.dqg, L, K, +1.f);
    if constexpr (kVec) {
        // ∂b_j −= dK̄_j ⊙ K̄_j; ∂b_last += Σ_j dK̄_j ⊙ K̄_j (the last token's two terms cancel: skipped)
        for (int c = threadIdx.x; c < K; c += blockDim.x) {
            float s = 0.f;
            for (int i = 0; i < L - 1; ++i) {
                const float t = w.dkbar[i * K + c] * w.kbar[i * K + c];
                w.db[i * K + c] -= t;
                s += t;
            }
            db_last[c] += s;
        }
        __syncthreads();
        // ∂/∂g_t = Σ_{i ≥ t} ∂/∂b_i
        for (int c = threadIdx.x; c < K; c += blockDim.x) {
            float s = 0.f;
            for (int i = L - 1; i >= 0; --i) {
                s += w.db[i * K + c];
                w.dg[i * K + c] = s;
            }
        }
        __syncthreads();
    } else {
        add_db<false>(w.w, w.kbar, w.dkbar, L, K, +1.f);
        // dg_t = c_last + Σ_{i ≥ t} Σ_{j < t} F_ij + Σ_{i ≥ t} u_i + Σ_{j < t} w_j
        for (int t = threadIdx.x; t < L; t += blockDim.x) {
            float s = w.c_last[0];
            for (int i = t; i < L; ++i) {
                for (int j = 0; j < t; ++j) s += w.f[i * kC + j];
                s += w.u[i];
            }
            for (int j = 0; j < t; ++j) s += w.w[j];
            w.dg[t] = s;
        }
        __syncthreads();
    }
}

// ---- the kernel ---------------------------------------------------------------------------------

__device__ inline int64_t tok(const int64_t (&s)[3], int b, int64_t t, int h) { return b * s[0] + t * s[1] + h * s[2]; }

// Loads the chunk's tokens of value head hv through the per-token transforms.
__device__ inline void load_chunk(const Params& p, const Ws& w, const ChunkInfo& ci, int hv) {
    const int K = p.K, V = p.V, W = p.W, h = hv / p.G, L = ci.len;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int i = warp; i < L; i += warps) {
        const int64_t t = ci.start + i;
        for (int which = 0; which < 2; ++which) {
            const void* src = which == 0 ? p.q : p.k;
            const DType dt = which == 0 ? p.q_dt : p.k_dt;
            const int64_t off = which == 0 ? tok(p.qs, ci.batch, t, h) : tok(p.ks, ci.batch, t, h);
            float* dst = (which == 0 ? w.q : w.k) + i * K;
            float ss = 0.f;
            for (int c = lane; c < K; c += 32) {
                const float x = load_any(src, dt, off + c);
                dst[c] = x;
                ss += x * x;
            }
            float f = which == 0 ? p.scale : 1.f;
            if (p.qk_l2norm) {
                ss = lane_group_sum<32>(ss);
                f *= 1.f / sqrtf(ss + float(kL2NormEps));
            }
            for (int c = lane; c < K; c += 32) dst[c] *= f;
        }
    }
    for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x) {
        const int i = idx / V, e = idx % V;
        const int64_t t = ci.start + i;
        w.v[idx] = load_any(p.v, p.v_dt, tok(p.vs, ci.batch, t, hv) + e);
        w.dO[idx] = load_any(p.d_o, p.do_dt, tok(p.dos, ci.batch, t, hv) + e);
    }
    const bool gated = p.gate_act != GateActivation::None;
    for (int idx = threadIdx.x; idx < L * W; idx += blockDim.x) {
        const int i = idx / W, c = idx % W;
        const int64_t t = ci.start + i;
        float x = 0.f;
        switch (p.decay) {
            case Decay::None: break;
            case Decay::Fixed: x = load_any(p.g, p.g_dt, hv * p.gs[0]); break;
            default: {
                x = load_any(p.g, p.g_dt, tok(p.gs, ci.batch, t, hv) + c);
                if (gated) {
                    x += static_cast<const float*>(p.dt_bias)[hv * p.dtb_s + c];
                    w.gate_in[idx] = x;
                    x = gate_log_decay(p.gate_act, p.lower_bound, x, static_cast<const float*>(p.A_log)[hv * p.alog_s]);
                }
                break;
            }
        }
        w.g[idx] = x;
    }
    for (int i = threadIdx.x; i < L; i += blockDim.x)
        w.beta[i] = p.beta ? beta_value(p.beta_act, load_any(p.beta, p.beta_dt, tok(p.bs, ci.batch, ci.start + i, hv)))
                           : 1.f;
    __syncthreads();
    for (int ch = threadIdx.x; ch < W; ch += blockDim.x) {
        float run = 0.f;
        for (int i = 0; i < L; ++i) {
            run += w.g[i * W + ch];
            w.b[i * W + ch] = run;
        }
    }
    __syncthreads();
}

// The chunk's start state and end-state gradient (stages 1 and 2) as fp32.
__device__ inline void load_states(const Params& p, const Ws& w, int chunk, int hv) {
    const int64_t KV = int64_t(p.K) * p.V, at = (int64_t(chunk) * p.HV + hv) * KV;
    for (int64_t idx = threadIdx.x; idx < KV; idx += blockDim.x) {
        w.S[idx] = load_any(p.states, p.st_dt, at + idx);
        w.dS[idx] = load_any(p.dstates, p.st_dt, at + idx);
    }
}

// dv, dβ and dg of the chunk for value head hv; the per-head parameter gradients summed over the
// chunk into w.red and added to the fp64 accumulators (one atomic per chunk and channel).
template <bool kDelta>
__device__ void store_value_head_grads(const Params& p, const Ws& w, const ChunkInfo& ci, int hv) {
    const int L = ci.len, V = p.V, W = p.W;
    const float* dv = kDelta ? w.dy : w.dx;
    if (p.dv)
        for (int idx = threadIdx.x; idx < L * V; idx += blockDim.x)
            store_any(p.dv, p.dv_dt, tok(p.dvs, ci.batch, ci.start + idx / V, hv) + idx % V, dv[idx]);
    if (kDelta && p.dbeta)
        for (int i = threadIdx.x; i < L; i += blockDim.x) {
            const int64_t t = ci.start + i;
            const float raw = load_any(p.beta, p.beta_dt, tok(p.bs, ci.batch, t, hv));
            p.dbeta[tok(p.dbs, ci.batch, t, hv)] = w.dbeta[i] * beta_derivative(p.beta_act, raw);
        }
    if (p.decay != Decay::None) {
        const bool gated = p.gate_act != GateActivation::None && p.decay != Decay::Fixed;
        // one thread per channel walks the chunk's tokens: dg out, and the channel's sums
        for (int ch = threadIdx.x; ch < W; ch += blockDim.x) {
            float s_dx = 0.f, s_alog = 0.f;
            for (int i = 0; i < L; ++i) {
                float dgi = w.dg[i * W + ch];
                if (gated) {
                    float d_dx = 1.f, d_dalog = 0.f;
                    gate_derivatives(p.gate_act, p.lower_bound, w.gate_in[i * W + ch],
                                     static_cast<const float*>(p.A_log)[hv * p.alog_s], &d_dx, &d_dalog);
                    s_alog += dgi * d_dalog;
                    dgi *= d_dx;
                }
                s_dx += dgi;
                if (p.dg && p.decay != Decay::Fixed) p.dg[tok(p.dgs, ci.batch, ci.start + i, hv) + ch] = dgi;
            }
            w.red[ch] = s_dx;
            w.red[W + ch] = s_alog;
        }
        __syncthreads();
        if (p.decay == Decay::Fixed) {
            if (threadIdx.x == 0) atomicAdd(p.params_acc + hv, double(w.red[0]));
        } else if (gated) {
            for (int ch = threadIdx.x; ch < W; ch += blockDim.x)
                atomicAdd(p.params_acc + 2 * p.HV + int64_t(hv) * W + ch, double(w.red[ch]));
            if (threadIdx.x == 0) {
                double a = 0.0;
                for (int ch = 0; ch < W; ++ch) a += double(w.red[W + ch]);
                atomicAdd(p.params_acc + p.HV + hv, a);
            }
        }
    }
    __syncthreads();  // the chunk's scratch is the next value head's
}

template <bool kVec, bool kDelta>
__global__ void __launch_bounds__(kThreads) chunk_bwd_kernel(const Params p) {
    const int K = p.K;
    Ws w;
    layout(p.scratch + int64_t(blockIdx.x) * p.scratch_floats, K, p.V, p.W, &w);
    const int64_t items = int64_t(p.n_chunks) * p.H;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const int chunk = int(item / p.H), h = int(item % p.H);
        const ChunkInfo ci = p.chunks[chunk];
        const int L = ci.len;
        for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) w.dqa[idx] = w.dka[idx] = 0.f;
        __syncthreads();
        for (int hv = h * p.G; hv < (h + 1) * p.G; ++hv) {
            load_chunk(p, w, ci, hv);
            load_states(p, w, chunk, hv);
            __syncthreads();
            chunk_backward<kVec, kDelta>(w, w.S, L, K, p.V, w.dqa, w.dka);
            store_value_head_grads<kDelta>(p, w, ci, hv);
        }

        // dq, dk through the scale and the in-kernel L2 norm: dx = (dy − y⟨y, dy⟩) / ‖x‖, one warp per token
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int i = warp; i < L; i += warps) {
            const int64_t t = ci.start + i;
            for (int which = 0; which < 2; ++which) {
                float* d = (which == 0 ? w.dqa : w.dka) + int64_t(i) * K;
                void* out = which == 0 ? p.dq : p.dk;
                const float f = which == 0 ? p.scale : 1.f;
                const void* src = which == 0 ? p.q : p.k;
                const DType dt = which == 0 ? p.q_dt : p.k_dt;
                const int64_t off = which == 0 ? tok(p.qs, ci.batch, t, h) : tok(p.ks, ci.batch, t, h);
                l2norm_scale_backward_row(d, K, f, p.qk_l2norm, lane, [&](int c) { return load_any(src, dt, off + c); });
                __syncwarp();
                if (out) {
                    const DType odt = which == 0 ? p.dq_dt : p.dk_dt;
                    const int64_t ooff = which == 0 ? tok(p.dqs, ci.batch, t, h) : tok(p.dks, ci.batch, t, h);
                    for (int c = lane; c < K; c += 32) store_any(out, odt, ooff + c, d[c]);
                }
            }
        }
        __syncthreads();  // the scratch is the next item's
    }
}

}  // namespace bwd

// Resident blocks of the per-chunk kernel (each owns a scratch): as many as fit on the device.
template <bool kVec, bool kDelta>
int backward_blocks() {
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bwd::chunk_bwd_kernel<kVec, kDelta>, bwd::kThreads, 0);
    return std::max(1, per_sm);
}

template <bool kVec, bool kDelta>
void launch_backward(const bwd::Params& p, int blocks, const char* op) {
    bwd::chunk_bwd_kernel<kVec, kDelta><<<blocks, bwd::kThreads, 0, launch_stream()>>>(p);
    check_cuda(cudaGetLastError(), op, "chunk_bwd launch");
}

}  // namespace hla::linear::cuda
