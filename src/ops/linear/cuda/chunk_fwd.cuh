// hla — chunked forward of the linear family on CUDA (SPECS.md §1, "Chunked forward").
//
// Two kernels, one design for all seven cells (decay and update are template parameters):
//
//   chunk_prepare  one block per (chunk of 64 tokens, value head), all chunks in parallel. Everything
//                  that does not depend on the state: the in-chunk cumulative log decay b, the decayed
//                  copies Qg = sQ⊙γ and Kd = K⊙γ_C⊘γ, the masked decayed scores
//                  P_ij = ⟨sq_i⊙γ_i, k_j⊘γ_j⟩ (j ≤ i), γ_C, and for the delta rule
//                  A_ij = β_i⟨k_i⊙γ_i, k_j⊘γ_j⟩ (j < i), L = (I + A)^{-1}, W = L diag(β)(K⊙γ), U = L diag(β) V.
//   chunk_scan     one block per (sequence, value head, V-tile) walking its chunks in order with the
//                  state S (K × VT, fp32) in registers:
//                      Ũ = U − W S (delta) or V (additive)
//                      O = Qg S + P Ũ
//                      S ← diag(γ_C) S + Kdᵀ Ũ
//                  so the scan needs no knowledge of the decay: it is one kernel for every cell.
//                  Where the decay is one number per token (bf16 forward), Qg and Kd are q and k with
//                  per-row factors: prepare writes only those factors, and the scan reads q, k (and V
//                  for the additive update) from the inputs and applies them (FwdParams::qk_rowf).
//                  bf16 operands take chunk_scan_ws_kernel: the same recurrence on wgmma with the
//                  warps split into a state warpgroup (Ũ, S), an output warpgroup (O) and a producer
//                  warp issuing the copy engine's copies; fp32 operands (fp32 and fp16 inputs)
//                  chunk_scan_kernel, 4 warps each doing all of it. For the single-shot delta rule on
//                  bf16, U and W are not prepare's: prepare writes T = L diag(β) (and for vector
//                  decay K⊙γ instead of W) and a third warpgroup of the scan forms U = T V and
//                  W = T (K⊙γ) as each chunk's copies land (FwdParams::Tw, Kg; no producer warp then,
//                  see ScanWs).
//
// Numerics: γ_i = exp(b_i) ≤ 1 and γ_C/γ_j = exp(b_C − b_j) ≤ 1 are always safe. The scores need
// exp(b_i − b_j) per key channel for vector decay; they are factored around the first token r of each
// 16-token row block: (q_i ⊙ exp(b_i − b_r)) · (k_j ⊙ exp(b_r − b_j)). Both factors are ≤ 1 for
// j < r; inside the diagonal block exp(b_r − b_j) ≥ 1 grows with the block's decay span, so when any
// channel decays by more than e^80 across the block (g = −1000 does), that block's scores are
// computed entry by entry with exp(b_i − b_j) instead.
//
// Precision: for fp32 and fp16 inputs the prepare kernel below works in fp32 with tf32 tensor cores
// (3×tf32 for fp32 inputs); bf16 inputs take chunk_prepare_mma (chunk_prepare_mma.cuh: bf16 tensor
// cores, fp32 accumulation, a tf32 inverse). The intermediates and the scan's matrix operands are
// stored in the input dtype (fp32 for fp16 inputs); accumulation and the state are fp32.
#pragma once

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/chunk_prepare_mma.cuh"
#include "ops/linear/cuda/common.cuh"
#include "ops/linear/cuda/forward_plan.hpp"
#include "ops/linear/cuda/fwd_params.cuh"
#include "ops/linear/cuda/tma.cuh"
#include "ops/linear/cuda/wgmma.cuh"
#include "ops/linear/problem.hpp"

namespace hla::linear::cuda {

// ---- chunk_prepare ------------------------------------------------------------------------------

// 16 warps: the block holds 150–220 KiB of shared memory (one block per SM), so its own warps are
// all the latency hiding there is.
constexpr int kPrepThreads = 512;

template <int K>
struct PrepLayout {
    static constexpr int LD = K + 4;  // float row stride: tf32 fragment loads hit 32 distinct banks
    static constexpr int LDA = kChunk + 4;
    static constexpr int LDV = 128 + 4;  // βV rows, V ≤ 128
    template <bool vec, bool delta>
    static constexpr int kc_floats() {
        return std::max(vec ? kChunk * LD : 0, kChunk * LDV);
    }
};

template <Decay D, Update Up, int K>
constexpr size_t prep_smem_bytes() {
    using L = PrepLayout<K>;
    constexpr bool vec = D == Decay::Vector;
    size_t f = 0;
    f += 2 * kChunk * L::LD;                        // qs, ks
    f += 2 * (vec ? kChunk * L::LD : kChunk);       // bs: cumulative log decay, fp64
    f += L::template kc_floats<vec, Up == Update::Delta>();  // kc (decayed keys of a row block), later βV
    f += 2 * kSub * L::LD;                          // qh, kh (and scratch of the inverse)
    f += 2 * kChunk * L::LDA;                       // Am, Pm
    f += kChunk;                                    // β
    f += 2 * kChunk;                                // per-token decay factors (scalar decays)
    return f * sizeof(float);
}

template <class In, class E, Decay D, Update Up, int K>
__global__ void __launch_bounds__(kPrepThreads, 1) chunk_prepare_kernel(const FwdParams p) {
    allow_dependent_launch();  // the scan's blocks may take the SMs the last wave leaves
    using L = PrepLayout<K>;
    constexpr int LD = L::LD, LDA = L::LDA;
    constexpr bool kVec = D == Decay::Vector;
    constexpr bool kDelta = Up == Update::Delta;
    constexpr bool kSplit = sizeof(E) == 4;
    extern __shared__ float4 smem_f4[];
    float* smem = reinterpret_cast<float*>(smem_f4);
    float* qs = smem;
    float* ks = qs + kChunk * LD;
    // The cumulative log decay is kept in fp64: with g = −1000 the in-chunk sums reach −3·10^4, where
    // an fp32 ulp (0.002) would make every exp(b_i − b_j) of nearby tokens wrong by 0.2%.
    double* bsm = reinterpret_cast<double*>(ks + kChunk * LD);
    float* kc = reinterpret_cast<float*>(bsm + (kVec ? kChunk * LD : kChunk));
    float* vb = kc;  // V (βV) reuses the decayed-key rows once the scores are done
    float* qh = kc + L::template kc_floats<kVec, kDelta>();
    float* kh = qh + kSub * LD;
    float* Am = kh + kSub * LD;
    float* Pm = Am + kChunk * LDA;
    float* betas = Pm + kChunk * LDA;
    float* rowf = betas + kChunk;  // e^{b_i}, e^{b_C − b_i} for decays that are one number per token

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int chunk = blockIdx.x, hv = blockIdx.y, h = hv / p.G;
    const ChunkInfo ci = p.chunks[chunk];
    const int len = ci.len;

    // ---- load q, k (zero past the end), normalise, scale ----
    load_rows<In, kChunk, K, kPrepThreads>(
        qs, LD, static_cast<const In*>(p.q) + ci.batch * p.qs[0] + int64_t(ci.start) * p.qs[1] + h * p.qs[2], p.qs[1], len);
    load_rows<In, kChunk, K, kPrepThreads>(
        ks, LD, static_cast<const In*>(p.k) + ci.batch * p.ks[0] + int64_t(ci.start) * p.ks[1] + h * p.ks[2], p.ks[1], len);
    // β and the per-token gate
    if (tid < kChunk) {
        const int i = tid;
        const int64_t t = ci.start + i;
        if constexpr (kDelta) {
            float b = 0.f;
            if (i < len) b = beta_value(p.beta_act, load_any(p.beta, p.beta_dtype, ci.batch * p.bs[0] + t * p.bs[1] + hv * p.bs[2]));
            betas[i] = b;
        }
        if constexpr (D == Decay::Scalar) {
            double gl = 0.0;
            if (i < len) {
                const float x = load_any(p.g, p.g_dtype, ci.batch * p.gs[0] + t * p.gs[1] + hv * p.gs[2]);
                gl = p.gate_act == GateActivation::None
                         ? x
                         : gate_log_decay(p.gate_act, p.lower_bound, x + static_cast<const float*>(p.dt_bias)[hv],
                                          static_cast<const float*>(p.A_log)[hv]);
            }
            bsm[i] = gl;
        } else if constexpr (D == Decay::Fixed) {
            bsm[i] = double(min(i + 1, len)) * static_cast<const float*>(p.g)[hv];
        } else if constexpr (D == Decay::None) {
            bsm[i] = 0.0;
        }
    }
    if constexpr (kVec) {
        // raw gate rows into the (still free) decayed-key rows, then the activation into fp64
        float* graw = kc;
        const int64_t goff = ci.batch * p.gs[0] + int64_t(ci.start) * p.gs[1] + hv * p.gs[2];
        load_rows_any<kChunk, K, kPrepThreads>(graw, LD, p.g, p.g_dtype, goff, p.gs[1], len);
        __syncthreads();
        for (int idx = tid; idx < kChunk * K; idx += kPrepThreads) {
            const int i = idx / K, c = idx % K;
            double gl = 0.0;
            if (i < len) {
                const float x = graw[i * LD + c];
                gl = p.gate_act == GateActivation::None
                         ? x
                         : gate_log_decay(p.gate_act, p.lower_bound, x + static_cast<const float*>(p.dt_bias)[hv * K + c],
                                          static_cast<const float*>(p.A_log)[hv]);
            }
            bsm[i * LD + c] = gl;
        }
    }
    __syncthreads();
    // In-chunk cumulative sums (the fixed decay is already cumulative).
    if constexpr (kVec) {
        if (tid < K) {
            double run = 0.0;
            for (int i = 0; i < kChunk; ++i) {
                run += bsm[i * LD + tid];
                bsm[i * LD + tid] = run;
            }
        }
    } else if constexpr (D == Decay::Scalar) {
        if (warp == 0) {
            // two tokens per lane, then a warp scan
            const double a = bsm[2 * lane], b = bsm[2 * lane + 1];
            double s = a + b;
            for (int off = 1; off < 32; off <<= 1) {
                const double n = __shfl_up_sync(0xffffffffu, s, off);
                if (lane >= off) s += n;
            }
            const double before = s - (a + b);
            bsm[2 * lane] = before + a;
            bsm[2 * lane + 1] = before + a + b;
        }
    }
    // q/k L2 norm (one warp per row), then the scale on q.
    for (int i = warp; i < kChunk; i += kPrepThreads / 32) {
        float sq = 0.f, sk = 0.f;
        for (int c = lane; c < K; c += 32) {
            sq += qs[i * LD + c] * qs[i * LD + c];
            sk += ks[i * LD + c] * ks[i * LD + c];
        }
        const float2 f = qk_row_factors(sq, sk, p.scale, p.qk_l2norm);
        const float fq = f.x, fk = f.y;
        for (int c = lane; c < K; c += 32) {
            qs[i * LD + c] *= fq;
            ks[i * LD + c] *= fk;
        }
    }
    __syncthreads();

    // exp of a log decay: the accurate expf on the fp32 path (its 1e-5 tolerance), the fast one else.
    auto ex = [](float x) -> float {
        if constexpr (kSplit) return expf(x);
        else return __expf(x);
    };
    auto bval = [&](int i, int c) -> double {
        if constexpr (kVec) return bsm[i * LD + c];
        else return bsm[i];
    };

    // ---- scores P (and A for the delta rule) ----
    if constexpr (!kVec) {
        // exp(b_i − b_j) is a scalar per pair: multiply after the product.
        // warp → (which: 0 → P from rows of q, 1 → A from rows of k; row tile; half of the columns)
        const int which = (warp >> 2) & 1, mt = warp & 3, nh = warp >> 3;
        if (which == 0 || kDelta) {
            float acc[1][4][4];
            zero_acc(acc);
            const float* arow = (which == 0 ? qs : ks) + mt * 16 * LD;
            warp_gemm<float, 1, 4, kSplit>(acc, Tile<float>{arow, LD, 1}, Tile<float>{ks + nh * 32 * LD, 1, LD}, K);
            float* out = which == 0 ? Pm : Am;
            for_each_acc(acc, [&](int r, int jj, float& x) {
                const int i = mt * 16 + r, j = nh * 32 + jj;
                float val = 0.f;
                if (which == 0 ? j <= i : j < i) {
                    val = x;
                    if constexpr (D != Decay::None) val *= ex(float(bsm[i] - bsm[j]));
                    if (which == 1) val *= betas[i];
                }
                out[i * LDA + j] = val;
            });
        }
        __syncthreads();
    } else {
        for (int blk = 0; blk < kChunk / kSub; ++blk) {
            const int r0 = blk * kSub;
            const int ncols = r0 + kSub;
            // span of the diagonal block: does exp(b_r − b_j) stay below e^80 for every channel?
            bool unsafe = false;
            for (int c = tid; c < K; c += kPrepThreads) unsafe |= (bval(r0, c) - bval(r0 + kSub - 1, c)) > double(kSafeSpan);
            unsafe = __syncthreads_or(unsafe);
            for (int idx = tid; idx < kSub * K; idx += kPrepThreads) {
                const int i = idx / K, c = idx % K;
                const float f = ex(float(bval(r0 + i, c) - bval(r0, c)));
                qh[i * LD + c] = qs[(r0 + i) * LD + c] * f;
                kh[i * LD + c] = ks[(r0 + i) * LD + c] * f;
            }
            for (int idx = tid; idx < ncols * K; idx += kPrepThreads) {
                const int j = idx / K, c = idx % K;
                float val = 0.f;
                if (j < r0 || !unsafe) val = ks[j * LD + c] * ex(float(bval(r0, c) - bval(j, c)));
                kc[j * LD + c] = val;
            }
            __syncthreads();
            // warp → (which, 8 columns 16·nq + 8·nh .. + 7)
            const int which = (warp >> 2) & 1, nq = warp & 3, nh = warp >> 3;
            if ((which == 0 || kDelta) && nq * 16 < ncols) {
                float acc[1][1][4];
                zero_acc(acc);
                warp_gemm<float, 1, 1, kSplit>(acc, Tile<float>{which == 0 ? qh : kh, LD, 1},
                                               Tile<float>{kc + (nq * 16 + nh * 8) * LD, 1, LD}, K);
                float* out = which == 0 ? Pm : Am;
                for_each_acc(acc, [&](int r, int cc, float& x) {
                    const int i = r0 + r, j = nq * 16 + nh * 8 + cc;
                    float val = 0.f;
                    if (which == 0 ? j <= i : j < i) val = which == 0 ? x : x * betas[i];
                    out[i * LDA + j] = val;
                });
            }
            // columns past the diagonal block are zero
            for (int idx = tid; idx < kSub * (kChunk - ncols); idx += kPrepThreads) {
                const int i = r0 + idx / (kChunk - ncols), j = ncols + idx % (kChunk - ncols);
                Pm[i * LDA + j] = 0.f;
                Am[i * LDA + j] = 0.f;
            }
            __syncthreads();
            if (unsafe) {
                // entry by entry: Σ_c x_ic k_jc exp(b_ic − b_jc), each factor ≤ 1
                for (int pr = tid; pr < kSub * kSub; pr += kPrepThreads) {
                    const int i = r0 + pr / kSub, j = r0 + pr % kSub;
                    if (j > i) continue;
                    float sp = 0.f, sa = 0.f;
                    for (int c = 0; c < K; ++c) {
                        const float e = ex(float(bval(i, c) - bval(j, c))) * ks[j * LD + c];
                        sp += qs[i * LD + c] * e;
                        sa += ks[i * LD + c] * e;
                    }
                    Pm[i * LDA + j] = sp;
                    if (j < i) Am[i * LDA + j] = kDelta ? sa * betas[i] : 0.f;
                }
                __syncthreads();
            }
        }
    }

    // ---- V (into the decayed-key rows, free now) ----
    const int V = p.V;
    {
        const In* vsrc = static_cast<const In*>(p.v) + ci.batch * p.vs[0] + int64_t(ci.start) * p.vs[1] + hv * p.vs[2];
        if (V == 128) load_rows<In, kChunk, 128, kPrepThreads>(vb, L::LDV, vsrc, p.vs[1], len);
        else load_rows<In, kChunk, 64, kPrepThreads>(vb, L::LDV, vsrc, p.vs[1], len);
    }

    // ---- per-chunk outputs that need no inverse: Qg, Kd, γ_C, P (and U = V for the additive update) ----
    const size_t slot = size_t(chunk) * p.HV + hv;
    E* Ug = static_cast<E*>(p.U) + slot * size_t(kChunk) * V;
    E* Qg = static_cast<E*>(p.Qg) + slot * kChunk * K;
    E* Kd = static_cast<E*>(p.Kd) + slot * kChunk * K;
    E* Pg = static_cast<E*>(p.P) + slot * kChunk * kChunk;
    // Per-token factors where the decay is one number per token: 2 exps per row instead of per element.
    if constexpr (!kVec) {
        if (tid < kChunk) {
            rowf[tid] = ex(float(bsm[tid]));
            rowf[kChunk + tid] = ex(float(bsm[kChunk - 1] - bsm[tid]));
        }
        __syncthreads();
    }
    // Qg = q ⊙ γ, Kd = k ⊙ γ_C ⊘ γ, 16 bytes per store; for the delta rule kb = β k ⊙ γ replaces q in
    // place (each element is read and rewritten by the same thread).
    constexpr int VE = 16 / sizeof(E);
    for (int u = tid; u < kChunk * K / VE; u += kPrepThreads) {
        const int i = u / (K / VE), c0 = (u % (K / VE)) * VE;
        float qv[VE], kv[VE];
#pragma unroll
        for (int j = 0; j < VE; ++j) {
            const int c = c0 + j;
            float fq, fk;
            if constexpr (kVec) {
                const double bi = bval(i, c);
                fq = ex(float(bi));
                fk = ex(float(bval(kChunk - 1, c) - bi));
            } else {
                fq = rowf[i];
                fk = rowf[kChunk + i];
            }
            const float k_ic = ks[i * LD + c];
            qv[j] = qs[i * LD + c] * fq;
            kv[j] = k_ic * fk;
            if constexpr (kDelta) qs[i * LD + c] = betas[i] * k_ic * fq;
        }
        store_vec<E>(Qg + i * K + c0, qv);
        store_vec<E>(Kd + i * K + c0, kv);
    }
    if (tid < K) p.gC[slot * K + tid] = ex(float(bval(kChunk - 1, tid)));
    for (int u = tid; u < kChunk * kChunk / VE; u += kPrepThreads) {
        const int i = u / (kChunk / VE), c0 = (u % (kChunk / VE)) * VE;
        float pv[VE];
#pragma unroll
        for (int j = 0; j < VE; ++j) pv[j] = Pm[i * LDA + c0 + j];
        store_vec<E>(Pg + i * kChunk + c0, pv);
    }
    if constexpr (!kDelta) {
        __syncthreads();
        for (int u = tid; u < kChunk * V / VE; u += kPrepThreads) {
            const int i = u / (V / VE), c0 = (u % (V / VE)) * VE;
            float uv[VE];
#pragma unroll
            for (int j = 0; j < VE; ++j) uv[j] = vb[i * L::LDV + c0 + j];
            store_vec<E>(Ug + i * V + c0, uv);
        }
    } else {
        __syncthreads();  // Pm is free from here on; qs holds kb = diag(β)(K ⊙ γ)
        float* kb = qs;
        constexpr int LDV = L::LDV;
        // L = (I + A)^{-1}, unit lower triangular, blockwise over 16×16 blocks. Pm becomes L.
        float* Lm = Pm;
        for (int idx = tid; idx < kChunk * kChunk; idx += kPrepThreads) Lm[(idx / kChunk) * LDA + idx % kChunk] = 0.f;
        for (int idx = tid; idx < kChunk * V; idx += kPrepThreads) vb[(idx / V) * LDV + idx % V] *= betas[idx / V];
        __syncthreads();
        if (warp < 4 && lane < kSub) {
            // diagonal block `warp`, column `lane`, by forward substitution
            const int o = warp * kSub, c = lane;
            float col[kSub];
#pragma unroll
            for (int i = 0; i < kSub; ++i) {
                float x = i == c ? 1.f : 0.f;
#pragma unroll
                for (int j = 0; j < i; ++j) x -= (j >= c ? Am[(o + i) * LDA + o + j] * col[j] : 0.f);
                col[i] = i < c ? 0.f : x;
            }
#pragma unroll
            for (int i = 0; i < kSub; ++i) Lm[(o + i) * LDA + o + c] = col[i];
        }
        __syncthreads();
        // L_IJ = −L_II Σ_{J ≤ M < I} A_IM L_MJ, row block by row block (X in the qh/kh scratch).
        float* X = qh;
        for (int I = 1; I < kChunk / kSub; ++I) {
            for (int idx = tid; idx < I * kSub * kSub; idx += kPrepThreads) {
                const int J = idx / (kSub * kSub), a = (idx / kSub) % kSub, b = idx % kSub;
                float x = 0.f;
                for (int m = J * kSub; m < I * kSub; ++m) x += Am[(I * kSub + a) * LDA + m] * Lm[m * LDA + J * kSub + b];
                X[idx] = x;
            }
            __syncthreads();
            for (int idx = tid; idx < I * kSub * kSub; idx += kPrepThreads) {
                const int J = idx / (kSub * kSub), a = (idx / kSub) % kSub, b = idx % kSub;
                float x = 0.f;
                for (int m = 0; m <= a; ++m) x += Lm[(I * kSub + a) * LDA + I * kSub + m] * X[J * kSub * kSub + m * kSub + b];
                Lm[(I * kSub + a) * LDA + J * kSub + b] = -x;
            }
            __syncthreads();
        }
        // W = L kb [64, K] on warps 0–7, U = L vb [64, V] on warps 8–15: warp → (row tile, half of the columns)
        E* Wg = static_cast<E*>(p.W) + slot * kChunk * K;
        const int mt = warp & 3, half = (warp >> 2) & 1;
        if (warp < 8) {
            constexpr int NT = K / 16;
            float acc[1][NT][4];
            zero_acc(acc);
            warp_gemm<float, 1, NT, kSplit>(acc, Tile<float>{Lm + mt * 16 * LDA, LDA, 1},
                                            Tile<float>{kb + half * (K / 2), LD, 1}, kChunk);
            store_acc<E>(acc, Wg + mt * 16 * K + half * (K / 2), K);
        } else if (V == 128) {
            float acc[1][8][4];
            zero_acc(acc);
            warp_gemm<float, 1, 8, kSplit>(acc, Tile<float>{Lm + mt * 16 * LDA, LDA, 1}, Tile<float>{vb + half * 64, LDV, 1},
                                           kChunk);
            store_acc<E>(acc, Ug + mt * 16 * V + half * 64, V);
        } else {
            float acc[1][4][4];
            zero_acc(acc);
            warp_gemm<float, 1, 4, kSplit>(acc, Tile<float>{Lm + mt * 16 * LDA, LDA, 1}, Tile<float>{vb + half * 32, LDV, 1},
                                           kChunk);
            store_acc<E>(acc, Ug + mt * 16 * V + half * 32, V);
        }
    }
}

// ---- chunk_scan ---------------------------------------------------------------------------------

// Row r of an accumulator tile times f[r]: each of the lane's fragment rows read once (MS as for
// for_each_acc_pair).
template <int MT, int NT, int MS = 16>
__device__ __forceinline__ void scale_acc_rows(float (&c)[MT][NT][4], const float* f) {
    const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float x = f[MS * i + g + 8 * hh];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                c[i][j][2 * hh] *= x;
                c[i][j][2 * hh + 1] *= x;
            }
        }
}

// ---- what both scan kernels share --------------------------------------------------------------
//
// A scan block walks the chunks of one chain (sequence si, value head hv) for the value columns
// [v0, v0 + VT). Its warps hold accumulator fragments of 16-row tiles; a warp's columns start at cw0.

// The addressing of a chain's chunks (sequence entry si, value head hv, its q/k head h): prepare's
// per-chunk operands live in slot(cidx), the raw inputs at the chunk's first token.
struct ScanChain {
    SeqInfo si;
    int hv, HV, h;
    __device__ ScanChain(const SeqInfo& s, int value_head, const FwdParams& p)
        : si(s), hv(value_head), HV(p.HV), h(value_head / p.G) {}
    __device__ int chunks() const { return (si.len + kChunk - 1) / kChunk; }
    __device__ size_t slot(int cidx) const { return size_t(si.first_chunk + cidx) * HV + hv; }
    __device__ int rows(int cidx) const { return min(kChunk, si.len - cidx * kChunk); }
    template <class E>
    __device__ const E* input_rows(const void* x, const int64_t* st, int head, int cidx) const {
        return static_cast<const E*>(x) + si.batch * st[0] + (si.start + int64_t(cidx) * kChunk) * st[1] + head * st[2];
    }
};

// Rows [0, valid) of a [kChunk, COLS] operand into shared memory (row stride ld) with cp.async, the
// rest zero-filled (raw input rows past the sequence's end belong to the next sequence or lie past
// the tensor; prepare's rows there are zero already). Thread t of N copies every N-th 16 bytes. When N
// is a multiple of a row's pieces, a thread's pieces share one column and lie a fixed number of rows
// apart, so its addresses are a base plus constant strides: the fp32 scan and the state pass issue
// these copies every chunk, where the general index arithmetic (a division and a 64-bit multiply a
// piece) was ~360 of an output warp's ~490 instructions a chunk (ncu, session 8's bf16 scan).
template <class E, int COLS, int N>
__device__ __forceinline__ void copy_rows_async(E* dst, int ld, const E* src, int64_t src_ld, int valid, int t) {
    constexpr int PER16 = 16 / sizeof(E), PR = COLS / PER16;
    static_assert(COLS % PER16 == 0, "copy_rows_async: rows of whole 16-byte pieces");
    if constexpr (N % PR == 0) {
        constexpr int RS = N / PR;  // rows from one of a thread's pieces to its next
        const int r0 = t / PR, c = (t % PR) * PER16;
        E* d = dst + r0 * ld + c;
        const E* s = src + r0 * src_ld + c;
#pragma unroll
        for (int j = 0; j < (kChunk + RS - 1) / RS; ++j) {
            const int r = r0 + j * RS;
            if constexpr (kChunk % RS != 0)
                if (r >= kChunk) break;
            const bool in = r < valid;
            cp_async16_zfill(d, in ? s : src, in);
            d += RS * ld;
            s += RS * src_ld;
        }
    } else {
        for (int idx = t; idx < kChunk * PR; idx += N) {
            const int r = idx / PR, c = idx % PR;
            const bool in = r < valid;
            cp_async16_zfill(dst + r * ld + c * PER16, src + (in ? r : 0) * src_ld + c * PER16, in);
        }
    }
}

// dst = diag(f) src for a [ROWS, COLS] tile of 16-bit elements (row stride ld in both), rounded once
// to E, 16 bytes at a time by threads t of n: the raw operands' diag(fk) V.
template <class E, int ROWS, int COLS>
__device__ __forceinline__ void scale_rows_into(E* dst, const E* src, int ld, const float* f, int t, int n) {
    constexpr int PER16 = 16 / sizeof(E), VPR = COLS / PER16;
    static_assert(sizeof(E) == 2 && COLS % PER16 == 0, "scale_rows_into: 16-bit rows of whole 16-byte pieces");
    for (int idx = t; idx < ROWS * VPR; idx += n) {
        const int r = idx / VPR, c0 = (idx % VPR) * PER16;
        const uint4 x = *reinterpret_cast<const uint4*>(src + r * ld + c0);
        const uint32_t w[4] = {x.x, x.y, x.z, x.w};
        float y[PER16];
#pragma unroll
        for (int e = 0; e < PER16; ++e) y[e] = unpack_elem<E>(w, e) * f[r];
        store_vec<E>(dst + r * ld + c0, y);
    }
}

// The state update's operands of chunk cidx into shared memory, by thread t of N: Kd (the raw k rows
// with raw_k, else prepare's), columns [v0, v0 + COLS) of U (the raw v rows with raw_v, else
// prepare's) and γ_C. The fp32 scan's and the state pass's copies.
template <class E, int K, int COLS, int N>
__device__ __forceinline__ void copy_update_operands(E* Kt, int ldk, E* Ut, int ldv, float* gc, const FwdParams& p,
                                                     const ScanChain& ch, int cidx, int v0, bool raw_k, bool raw_v,
                                                     int t) {
    const size_t slot = ch.slot(cidx);
    const int valid = ch.rows(cidx);
    if (raw_k) copy_rows_async<E, K, N>(Kt, ldk, ch.input_rows<E>(p.k, p.ks, ch.h, cidx), p.ks[1], valid, t);
    else copy_rows_async<E, K, N>(Kt, ldk, static_cast<const E*>(p.Kd) + slot * kChunk * K, K, kChunk, t);
    if (raw_v) copy_rows_async<E, COLS, N>(Ut, ldv, ch.input_rows<E>(p.v, p.vs, ch.hv, cidx) + v0, p.vs[1], valid, t);
    else copy_rows_async<E, COLS, N>(Ut, ldv, static_cast<const E*>(p.U) + slot * kChunk * p.V + v0, p.V, kChunk, t);
    for (int c = t; c < K / 4; c += N) cp_async16(gc + 4 * c, p.gC + slot * K + 4 * c);
}

// A ring of S operand stages filled with cp.async, chunk c in stage c % S, one commit group a chunk
// (empty past the end) so that a thread's wait counts chunks. copy_ring_start issues chunks
// [0, S − 1); at chunk c, after copy_ring_wait and a barrier (chunk c's operands are in place and the
// stage of chunk c − 1 is free), copy_ring_refill issues chunk c + S − 1 into that stage.
template <int S, class Fetch>
__device__ __forceinline__ void copy_ring_start(Fetch&& fetch, int nchunks) {
    for (int c = 0; c + 1 < S; ++c) {
        if (c < nchunks) fetch(c);
        cp_async_commit();
    }
}
template <int S>
__device__ __forceinline__ void copy_ring_wait() {
    cp_async_wait_group<S - 2>();  // this thread's copies of the current chunk are done
}
template <int S, class Fetch>
__device__ __forceinline__ void copy_ring_refill(Fetch&& fetch, int cidx, int nchunks) {
    if (cidx + S - 1 < nchunks) fetch(cidx + S - 1);
    cp_async_commit();
}

// The state fragment of a warp (keys [key0, key0 + 16·SMT), columns [col0, …) of the head's V) from
// the initial state, or zero.
template <int SMT, int NT, int MS = 16>
__device__ __forceinline__ void load_initial_state(float (&S)[SMT][NT][4], const FwdParams& p, int n, int hv, int key0,
                                                   int col0) {
    if (p.h0) {
        const float* h0 = static_cast<const float*>(p.h0) + n * p.h0s[0] + hv * p.h0s[1];
        for_each_acc<SMT, NT, MS>(S, [&](int r, int c, float& x) { x = h0[(key0 + r) * p.h0s[2] + col0 + c]; });
    } else {
        zero_acc(S);
    }
}

template <int SMT, int NT, int MS = 16>
__device__ __forceinline__ void store_final_state(float (&S)[SMT][NT][4], const FwdParams& p, int n, int hv, int key0,
                                                  int col0) {
    if (!p.ht || n < p.ht_seq0) return;
    float* ht = static_cast<float*>(p.ht) + (n - p.ht_seq0) * p.hts[0] + hv * p.hts[1];
    for_each_acc<SMT, NT, MS>(S, [&](int r, int c, float& x) { ht[(key0 + r) * p.hts[2] + col0 + c] = x; });
}

// The state fragment into a [key][v] shared-memory copy in the operand dtype (the products' B
// operand), two neighbouring columns per store; dst points at column cw0 of row 0.
template <class E, int SMT, int NT>
__device__ __forceinline__ void store_state_tile(const float (&S)[SMT][NT][4], E* dst, int lds, int key0) {
    const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
    for (int i = 0; i < SMT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
                store_pair(dst + (key0 + 16 * i + g + 8 * hh) * lds + 8 * j + 2 * t4, S[i][j][2 * hh], S[i][j][2 * hh + 1]);
}

// Ũ = U − W S for the warp's 16 rows [row0, +16) and its columns (WS = W S, accumulated), into Unew;
// with Uk also diag(fk) Ũ (raw operands: the update's right factor). Two columns per access; U, Unew
// and Uk point at column cw0 of row 0, row stride ldv.
template <class E, int NT>
__device__ __forceinline__ void form_u_tilde(const float (&WS)[1][NT][4], const E* U, E* Unew, E* Uk, const float* fk,
                                             int ldv, int row0) {
    const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + g + 8 * hh;
        const float f = Uk ? fk[row] : 1.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int at = row * ldv + 8 * j + 2 * t4;
            const float2 u = load_pair(U + at);
            const float u0 = u.x - WS[0][j][2 * hh], u1 = u.y - WS[0][j][2 * hh + 1];
            store_pair(Unew + at, u0, u1);
            if (Uk) store_pair(Uk + at, u0 * f, u1 * f);
        }
    }
}

// The warp's output tile O (rows [row0, +16) of chunk cidx, columns [col0, …) of the head's V) to o,
// the rows that exist. With 16-bit o in the operand dtype and 4-byte aligned rows (pairs), each
// fragment's two neighbouring columns go as one store.
template <class E, int NT>
__device__ __forceinline__ void store_output_tile(float (&O)[1][NT][4], const FwdParams& p, const ScanChain& ch,
                                                  int cidx, int row0, int col0, bool pairs) {
    const int len = ch.rows(cidx);
    const int64_t t0 = ch.si.start + int64_t(cidx) * kChunk;
    const int64_t base = ch.si.batch * p.os[0] + ch.hv * p.os[2] + col0;
    if constexpr (sizeof(E) == 2) {
        if (pairs) {
            const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int row = row0 + g + 8 * hh;
                    if (row < len) {
                        E* at = static_cast<E*>(p.o) + base + (t0 + row) * p.os[1] + 8 * j + 2 * t4;
                        *reinterpret_cast<uint32_t*>(at) = pack2(from_f<E>(O[0][j][2 * hh]), from_f<E>(O[0][j][2 * hh + 1]));
                    }
                }
            return;
        }
    }
    for_each_acc(O, [&](int r, int c, float& x) {
        const int row = row0 + r;
        if (row < len) store_any(p.o, p.o_dtype, base + (t0 + row) * p.os[1] + c, x);
    });
}

// o can take two columns per store: the operand dtype, 4-byte aligned rows.
template <class E>
__device__ __forceinline__ bool output_pairs(const FwdParams& p) {
    return sizeof(E) == 2 && p.o && p.o_dtype == dtype_of<E>() && reinterpret_cast<uintptr_t>(p.o) % 4 == 0 &&
           p.os[0] % 2 == 0 && p.os[1] % 2 == 0 && p.os[2] % 2 == 0;
}

// ---- chunk_scan (fp32 operands: fp32 and fp16 inputs) ---------------------------------------------
//
// 4 warps; warp w owns output rows [16·w, +16) and state rows [16·SMT·w, +16·SMT), all VT columns.
// Shared memory: the operands read by the state update (Kd, P, U, γ_C) are double-buffered and
// fetched a whole chunk ahead; Qg and W, read before it, are single-buffered (two would not fit) and
// refilled for chunk c+1 once chunk c has formed Ũ. All copies are cp.async. The products split each
// fp32 operand into bf16 parts on the tensor cores (warp_gemm's kSplit).
template <int K, int VT, bool kDelta>
struct ScanLayout {
    static constexpr int LDK = K + 4;        // rows of Qg, Kd, W
    static constexpr int LDP = kChunk + 4;   // rows of P
    static constexpr int LDV = VT + 4;       // rows of U and Ũ
    static constexpr int LDS = VT + 8;       // rows of the state [key][v]: the fp32 fragment loads hit
                                             // distinct banks
    static constexpr size_t stage_a = (kDelta ? 2 : 1) * kChunk * LDK;             // Qg (, W)
    static constexpr size_t stage_b = kChunk * LDK + kChunk * LDP + kChunk * LDV;  // Kd, P, U
    static constexpr size_t elems = stage_a + 2 * stage_b + kChunk * LDV + K * LDS;  // + Ũ, state
    static constexpr size_t bytes = (elems + 2 * K) * sizeof(float);               // + 2 × γ_C
};

constexpr int kScanThreads = 128;

template <Update Up, int K, int VT>
__global__ void __launch_bounds__(kScanThreads) chunk_scan_kernel(const FwdParams p) {
    using E = float;
    constexpr bool kDelta = Up == Update::Delta;
    using L = ScanLayout<K, VT, kDelta>;
    constexpr int LDK = L::LDK, LDP = L::LDP, LDV = L::LDV, LDS = L::LDS;
    constexpr int NT = VT / 8;  // n-tiles of the V-tile
    static_assert(NT % 2 == 0, "chunk_scan: the columns must pair up for the fragment loads");
    constexpr int SMT = K / 64;  // m-tiles of state rows per warp (4 row groups × 16·SMT = K)
    extern __shared__ float4 smem_f4[];
    E* Qt = reinterpret_cast<E*>(smem_f4);  // Qg (, W)
    E* Wt = Qt + kChunk * LDK;
    E* stage = Qt + L::stage_a;  // 2 × (Kd, P, U)
    E* Unew = stage + 2 * L::stage_b;
    E* Sb = Unew + kChunk * LDV;  // state [key][v]
    float* gcs = Sb + K * LDS;    // 2 × γ_C
    auto Kt_of = [&](int b) { return stage + b * L::stage_b; };
    auto Pt_of = [&](int b) { return stage + b * L::stage_b + kChunk * LDK; };
    auto Ut_of = [&](int b) { return stage + b * L::stage_b + kChunk * LDK + kChunk * LDP; };

    wait_for_previous_kernel();  // prepare's operands (launch_scan_grid)
    const int tid = threadIdx.x, mw = tid >> 5;
    const int n = blockIdx.x, hv = blockIdx.y, v0 = blockIdx.z * VT;
    const ScanChain ch(p.seqs[n], hv, p);
    const int nchunks = ch.chunks();

    auto fetch_qw = [&](int cidx) {
        const size_t slot = ch.slot(cidx);
        copy_rows_async<E, K, kScanThreads>(Qt, LDK, static_cast<const E*>(p.Qg) + slot * kChunk * K, K, kChunk, tid);
        if constexpr (kDelta)
            copy_rows_async<E, K, kScanThreads>(Wt, LDK, static_cast<const E*>(p.W) + slot * kChunk * K, K, kChunk, tid);
    };
    auto fetch_kpu = [&](int cidx) {
        const size_t slot = ch.slot(cidx);
        const int b = cidx & 1;
        copy_update_operands<E, K, VT, kScanThreads>(Kt_of(b), LDK, Ut_of(b), LDV, gcs + b * K, p, ch, cidx, v0, false,
                                                     false, tid);
        copy_rows_async<E, kChunk, kScanThreads>(Pt_of(b), LDP, static_cast<const E*>(p.P) + slot * kChunk * kChunk,
                                                 kChunk, kChunk, tid);
    };

    float S[SMT][NT][4];
    const int key0 = mw * 16 * SMT;
    load_initial_state(S, p, n, hv, key0, v0);
    store_state_tile(S, Sb, LDS, key0);
    if (nchunks > 0) {
        fetch_qw(0);
        fetch_kpu(0);
        cp_async_commit();
    }

    for (int cidx = 0; cidx < nchunks; ++cidx) {
        const int b = cidx & 1;
        const E* Kt = Kt_of(b);
        const E* Pt = Pt_of(b);
        const E* Ut = Ut_of(b);
        cp_async_wait_all();
        __syncthreads();  // chunk cidx's operands and the state Sb are in place
        if (cidx + 1 < nchunks) {
            fetch_kpu(cidx + 1);  // the other buffer: last read by chunk cidx − 1
            cp_async_commit();
        }
        // the backward's recompute keeps the chunk's start state (as the products below see it)
        if (p.states) store_acc<E>(S, static_cast<E*>(p.states) + ch.slot(cidx) * K * p.V + size_t(key0) * p.V + v0, p.V);
        // ---- O = Qg S and Ũ = U − W S, rows [16·mw, +16) ----
        float O[1][NT][4];
        zero_acc(O);
        const Tile<E> Sop{Sb, LDS, 1};  // (key, v) of the state
        if (p.o) warp_gemm<E, 1, NT, true>(O, Tile<E>{Qt + mw * 16 * LDK, LDK, 1}, Sop, K);
        if constexpr (kDelta) {
            float WS[1][NT][4];
            zero_acc(WS);
            warp_gemm<E, 1, NT, true>(WS, Tile<E>{Wt + mw * 16 * LDK, LDK, 1}, Sop, K);
            form_u_tilde<E, NT>(WS, Ut, Unew, nullptr, nullptr, LDV, mw * 16);
        }
        __syncthreads();  // Ũ complete; Qg and W are free
        if (cidx + 1 < nchunks) {
            fetch_qw(cidx + 1);
            cp_async_commit();
        }
        const E* Ueff = kDelta ? Unew : Ut;
        // ---- O += P Ũ; write the rows that exist ----
        if (p.o) {
            warp_gemm<E, 1, NT, true>(O, Tile<E>{Pt + mw * 16 * LDP, LDP, 1}, Tile<E>{Ueff, LDV, 1}, kChunk);
            store_output_tile<E, NT>(O, p, ch, cidx, mw * 16, v0, false);
        }
        // ---- S ← diag(γ_C) S + Kdᵀ Ũ ----
        scale_acc_rows(S, gcs + b * K + key0);
        warp_gemm<E, SMT, NT, true>(S, Tile<E>{Kt + key0, 1, LDK}, Tile<E>{Ueff, LDV, 1}, kChunk);
        __syncthreads();  // every read of Sb and Ũ is done
        store_state_tile(S, Sb, LDS, key0);
    }
    store_final_state(S, p, n, hv, key0, v0);
}

// ---- chunk_scan, warp-specialised (bf16 operands) -------------------------------------------------
//
// The same recurrence as chunk_scan_kernel, with the block's warps split by role so that the chain
// from one chunk's state to the next carries only what it must:
//   state warpgroup    Ũ = U − W S (delta rule), S ← diag(γ_C) S + Kdᵀ Ũ: the state stays in its
//                      registers;
//   output warpgroup   O = Qg S, O += P Ũ and the stores of o;
//   producer warp      one thread issues every operand copy (tma.cuh) kStages − 1 chunks ahead
//                      (kForm: the output warpgroup's first thread, see below).
// The products are wgmma (wgmma.cuh) on swizzled tiles, each operand read once per warpgroup (with
// mma.sync every warp re-read the B operand: the state and Ũ four times a chunk); the copies are the
// copy engine's, landing on a stage's `full` mbarrier, and every consumer thread arrives on the stage's
// `empty` one when done with it, so the producer refills it without a block barrier. The state
// warps hand Ũ over with a named barrier they only arrive at (the output warps wait on it), meet
// among themselves before Kdᵀ Ũ, and write the new state into the other of two state buffers, so one
// barrier of the consumer warps a chunk remains (operands and state in place).
// Shared memory written by the threads (Ũ, diag(fk) Ũ, the state, zeroed rows) is read by the
// products, which are the async proxy: each writer fences (wg::fence_proxy_async) before its barrier.
// History: session 5's scan (every warp issued its share of the copies and ran all four products
// between three block barriers) spent ~2 µs a chunk at B=1; session 6 split the roles (H100, bf16,
// H=16, K=V=128: Gated DeltaNet B=4 T=4096 0.497 -> 0.437 ms, B=1 T=16384 0.808 -> 0.737). A clock64
// trace of that design on mma.sync and cp.async (GDN B=1, 32 columns, ~3900 cycles a chunk) had the
// output warps spend ~1700 cycles a chunk issuing 16-byte copies and waiting for prepare's flags
// before their first product, the state warps waiting for them at the block barrier.
// A hand-off where the state warps also wait at the Ũ barrier measured 3.5% slower at B=1.
// compute-sanitizer racecheck reported hazards between the state's stores and the output warps' reads
// of it wherever the two roles waited at unequal numbers of barriers a chunk (the additive kernel as
// first written; the delta rule's full hand-off above, which only adds ordering), never where they
// waited at equal numbers; the order above excludes those races. So the additive kernel's output
// warps meet once a chunk too (kBarOutput).
// Warp layout: within each role, warp w owns rows [16·(w % 4), +16) of the chunk (state warps: keys
// 16·(w % 4) + 64·i, i < K/64, of S: wgmma's accumulator rows) and all VT columns of the tile.
//
// Raw operands (p.qk_rowf set: one decay number per token, forward only): the Qg and Kd (and, for
// the additive update, U) buffers receive the input rows of q and k (and v) instead of prepare's
// copies, with the chunk's row factors fq, fk beside γ_C; Qg S is then diag(fq)(q S) on the fp32
// product, and the update's Kdᵀ Ũ is kᵀ (diag(fk) Ũ), with diag(fk) Ũ rounded once into a second Ũ
// buffer.
// kForm: the scan forms U (and W) itself (FwdParams::Tw), on a third warpgroup.
template <bool kForm>
struct ScanWs {
    // One warpgroup a role over all VT columns (wgmma's N), and a producer warp that issues the copies:
    // waiting for the copy engine or (the concurrent forward) for prepare, it holds back neither role.
    static constexpr int kRoleThreads = 128;
    static constexpr int kRoles = kForm ? 3 : 2;  // state, output (, forming)
    // kForm: no producer warp; the output warpgroup's first thread issues the copies. A 13th warp
    // would cost the whole block registers: the register file goes out in 4-warp units, so 13 warps
    // get 128 registers a thread where the state warps take ~168 at 64 columns. The first version
    // (13 warps) spilled, and the forming warps' spills made the scan 4.4× slower (GDN B=4 T=4096,
    // ncu); setmaxnreg to move registers between the warpgroups of a 16-warp block was dropped by
    // ptxas ("ignored to maintain minimum register requirements").
    static constexpr int kProducerWarp = kForm ? -1 : 4 * kRoles;
    static constexpr int kThreads = kRoles * kRoleThreads + (kForm ? 0 : 32);
};

// Shared memory of chunk_scan_ws_kernel, in bytes. Every tile is a wgmma.cuh swizzled tile: the
// K-wide rows (Qg, W, Kd: 64 × K) and P (64 × 64) in 64-column blocks, the V-tile's (U, Ũ, diag(fk) Ũ:
// 64 × VT; the state: K × VT) as one block of VT columns. Tile sizes are multiples of 1 KiB, the
// 128-byte swizzle's period, from a 1 KiB-aligned base.
// kForm (the scan forms U and W): a stage also holds T (64 × 64); its U tile first receives the raw v
// rows and its W tile K⊙γ (formed from the raw k rows, or prepare's: FwdParams::Kg), which the
// forming warpgroup turns into U and W in place.
template <int K, int VT, bool kDelta, bool kForm = false>
struct ScanWsLayout {
    static constexpr size_t row_tile = size_t(kChunk) * K * 2;     // Qg, W, Kd
    static constexpr size_t p_tile = size_t(kChunk) * kChunk * 2;  // P, T
    static constexpr size_t v_tile = size_t(kChunk) * VT * 2;      // U, Ũ, diag(fk) Ũ
    static constexpr size_t s_tile = size_t(K) * VT * 2;           // a state buffer
    static_assert(row_tile % 1024 == 0 && v_tile % 1024 == 0 && s_tile % 1024 == 0, "chunk_scan_ws: 1 KiB tiles");
    static constexpr size_t stage_a = (kDelta ? 2 : 1) * row_tile;                   // Qg (, W)
    static constexpr size_t stage_b = row_tile + p_tile + v_tile + (kForm ? p_tile : 0);  // Kd, P, U (, T)
    static constexpr size_t fixed = v_tile + 2 * s_tile + v_tile;    // Ũ, 2 × state, diag(fk) Ũ
    static constexpr size_t kAlign = 1024;                           // room to align the dynamic base
    // row factors a chunk, the first rows of qk_rowf's: fq, fk (, φ)
    static constexpr int kRowf = kForm ? kRowPhi + 1 : kRowFk + 1;
    static_assert(kRowFq < kRowFk && kRowFk < kRowPhi && kRowPhi < kRowFactorRows, "chunk_scan_ws: row factor order");
    // with `st` operand stages: st × (Qg, W), st × (Kd, P, U), the fixed tiles; st × (γ_C, row
    // factors); 3 × st mbarriers (a stage's copies landed; every consumer warp is done with it; kForm:
    // W and U are formed)
    static constexpr size_t bytes_with(int st) {
        return kAlign + st * (stage_a + stage_b) + fixed + st * (K + kRowf * kChunk) * sizeof(float) +
               3 * st * sizeof(uint64_t);
    }
    // Three operand stages (each chunk's copies issued two chunks ahead) where they fit in an SM's
    // 227 KiB and two stages already take more than half of it (one block an SM either way), else two.
    // H100, bf16, H=16, K=V=128, two runs each against two stages in the same call (mma.sync scan):
    // simple GLA B=1 T=16384 (parallel pieces, 64 columns) 0.325 / 0.318 -> 0.312 / 0.314 ms, GLA
    // 0.482 / 0.483 -> 0.479 / 0.478; B=4 T=4096 within the run-to-run spread.
    static constexpr size_t kSmemMax = 227 * 1024;
    static constexpr int stages = bytes_with(3) <= kSmemMax && 2 * bytes_with(2) > kSmemMax ? 3 : 2;
    static constexpr size_t tiles = stages * (stage_a + stage_b) + fixed;  // bytes before the fp32 arrays
    static constexpr size_t bytes = bytes_with(stages);
};

// Rows [valid, kChunk) of a [kChunk, COLS] Swz<BC> tile set to zero, by thread t of n.
template <int BC, int COLS>
__device__ __forceinline__ void zero_rows_swz(unsigned char* tile, int valid, int t, int n) {
    constexpr int PR = COLS / 8;
    for (int idx = t; idx < (kChunk - valid) * PR; idx += n)
        *reinterpret_cast<uint4*>(tile + wg::Swz<BC>::template piece<kChunk>(valid + idx / PR, idx % PR)) =
            make_uint4(0, 0, 0, 0);
}

// dst = diag(f) src for rows [row0, row0 + ROWS) of [kChunk, COLS] bf16 Swz<BC> tiles, each element
// rounded once, 16 bytes at a time by thread t of N; rows ≥ valid are written zero without being read
// (another thread may be zeroing them). Every load before the first store: the compiler cannot tell
// the tiles apart and would otherwise wait out each load in turn. The raw additive update's diag(fk) V
// (state warps) and the forming warps' K⊙γ = diag(φ) k.
template <int BC, int COLS, int ROWS, int N>
__device__ __forceinline__ void scale_rows_swz(unsigned char* dst, const unsigned char* src, const float* f, int row0,
                                               int valid, int t) {
    using E = __nv_bfloat16;
    constexpr int PR = COLS / 8, kIters = ROWS * PR / N;
    static_assert(ROWS * PR % N == 0, "scale_rows_swz: the pieces must split evenly over the threads");
    uint4 x[kIters];
    uint32_t at[kIters];
    float s[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const int idx = t + N * it, row = row0 + idx / PR;
        const bool in = row < valid;
        at[it] = wg::Swz<BC>::template piece<kChunk>(row, idx % PR);
        x[it] = in ? *reinterpret_cast<const uint4*>(src + at[it]) : make_uint4(0, 0, 0, 0);
        s[it] = in ? f[row] : 0.f;
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const uint32_t w[4] = {x[it].x, x[it].y, x[it].z, x[it].w};
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = unpack_elem<E>(w, e) * s[it];
        store_vec<E>(reinterpret_cast<E*>(dst + at[it]), y);
    }
}

// The warp-specialised scan's tensor maps (tma.cuh): prepare's per-chunk operands as [slots·64, D]
// row blocks (Qg, Kd, W: D = K; P: 64; U: V), and with raw operands the inputs as 4-D [B, T, heads, D]
// views. Boxes of 64 rows × one swizzle block (64 columns; U and v: the V-tile's VT). T: FwdParams::Tw.
struct ScanMaps {
    CUtensorMap q, k, v, Qg, Kd, W, P, U, T;  // W: prepare's W, or the K⊙γ the scan forms it from (FwdParams::Kg)
};

// Named barriers 1 and up (0 is __syncthreads): n threads, a multiple of 32.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// The warpgroup scans' shared pieces (chunk_scan_ws_kernel, chunk_dstate_ws_kernel).
// A state warpgroup's fragment (warp mw: keys 16·mw + 64·i) into a [K][VT] Swz<VT> tile in bf16 (the
// products' B operand), two neighbouring columns per store.
template <int K, int VT, int SMT, int NT>
__device__ __forceinline__ void store_state_swz(float (&S)[SMT][NT][4], unsigned char* tile, int mw) {
    for_each_acc_pair<SMT, NT, 64>(S, [&](int r, int c, float& x0, float& x1) {
        *reinterpret_cast<uint32_t*>(tile + wg::Swz<VT>::template elem<K>(16 * mw + r, c)) =
            pack2(__float2bfloat16(x0), __float2bfloat16(x1));
    });
}
// The operand ring's mbarriers, by thread 0, then a block barrier: `full` (one arrival, the producer's,
// plus the copies' bytes) and `empty` (one arrival per consumer thread, tma::release_stage) of every
// stage, and where given `formed` (one arrival per forming thread: chunk_scan_ws_kernel's kForm).
__device__ __forceinline__ void init_stage_barriers(uint64_t* full, uint64_t* empty, int stages, int consumer_threads,
                                                    uint64_t* formed = nullptr, int forming_threads = 0) {
    if (threadIdx.x == 0) {
        for (int b = 0; b < stages; ++b) {
            tma::mbar_init(full + b, 1);
            tma::mbar_init(empty + b, consumer_threads);
            if (formed) tma::mbar_init(formed + b, forming_threads);
        }
        tma::fence_init();
    }
    __syncthreads();
}

// kConcurrent: the concurrent forward's scan, which waits for prepare's flags (FwdParams::ready); its
// own instantiation, the other's code as it was (the check alone cost the B=4 scan 4%).
// kForm (delta rule, FwdParams::Tw): a third warpgroup forms each chunk's U = T V from T and the raw
// v rows, and W = T (K⊙γ) too: with raw operands from the raw k rows and φ, with vector decay from
// prepare's K⊙γ (FwdParams::Kg, in W's place in the stage), as soon as the chunk's
// copies land and while the other two work on the chunk before: they never go through device memory.
// The state and output warpgroups then wait on the stage's `formed` barrier instead of its `full` one;
// the output warps no longer zero raw k rows past the end (the forming warps do) and one of them issues
// the copies. W and U get prepare's roundings: the same bf16 T, K⊙γ as k · φ in fp32 rounded once,
// fp32 accumulation, W and U rounded once; only the order in which the hardware accumulates the
// products may differ (wgmma here, mma.sync in prepare). The outputs have been bit for bit those of
// prepare's W and U in every test (PiecewiseForwardEqualsSingleShotOnAUserStream compares them).
template <Update Up, int K, int VT, bool kConcurrent = false, bool kForm = false>
__global__ void __launch_bounds__(ScanWs<kForm>::kThreads, 1)
    chunk_scan_ws_kernel(const FwdParams p, const __grid_constant__ ScanMaps maps) {
    using E = __nv_bfloat16;
    constexpr int kRole = ScanWs<kForm>::kRoleThreads, kConsumers = 2 * kRole;
    constexpr bool kDelta = Up == Update::Delta;
    static_assert(kDelta || !kForm, "chunk_scan_ws: only the delta rule forms W and U");
    static_assert(!(kConcurrent && kForm), "chunk_scan_ws: the concurrent forward reads prepare's W and U");
    using L = ScanWsLayout<K, VT, kDelta, kForm>;
    using RowT = wg::Swz<64>;  // Qg, W, Kd, P
    using ColT = wg::Swz<VT>;  // U, Ũ, diag(fk) Ũ, the state
    constexpr int NT = VT / 8;   // n-tiles of a warp's columns
    constexpr int SMT = K / 64;  // a state warp's m-tiles: keys 16·(w % 4) + 64·i
    constexpr int KS = K / 16;   // k-steps over the keys
    constexpr int kBarState = 1, kBarU = 2, kBarOutput = 3, kBarChunk = 4, kBarForm = 5;
    constexpr int kStages = L::stages;
    extern __shared__ float4 smem_f4[];
    unsigned char* const base = wg::aligned_smem<L::kAlign>(smem_f4);
    unsigned char* const stage_qw = base;                          // kStages × (Qg, W)
    unsigned char* const stage = stage_qw + kStages * L::stage_a;  // kStages × (Kd, P, U (, T))
    unsigned char* const Unew = stage + kStages * L::stage_b;      // Ũ = U − W S
    unsigned char* const Sbuf = Unew + L::v_tile;                  // 2 × state [key][v]
    unsigned char* const Uk = Sbuf + 2 * L::s_tile;                // diag(fk) Ũ (raw operands)
    constexpr int kRowf = L::kRowf;
    float* gcs = reinterpret_cast<float*>(base + L::tiles);        // kStages × γ_C
    float* rfs = gcs + kStages * K;                                // kStages × (fq, fk (, φ))
    uint64_t* full = reinterpret_cast<uint64_t*>(rfs + kStages * kRowf * kChunk);  // kStages: a stage's copies landed
    uint64_t* empty = full + kStages;                                              // kStages: the consumers are done with it
    uint64_t* formed = empty + kStages;                                            // kStages (kForm): W and U formed
    auto Qt_of = [&](int b) { return stage_qw + b * L::stage_a; };
    auto Wt_of = [&](int b) { return stage_qw + b * L::stage_a + L::row_tile; };
    auto Kt_of = [&](int b) { return stage + b * L::stage_b; };
    auto Pt_of = [&](int b) { return stage + b * L::stage_b + L::row_tile; };
    auto Ut_of = [&](int b) { return stage + b * L::stage_b + L::row_tile + L::p_tile; };
    auto Tt_of = [&](int b) { return stage + b * L::stage_b + L::row_tile + L::p_tile + L::v_tile; };

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool state_role = warp < 4;
    const int mw = warp & 3, rt = tid % kRole;  // warp and thread index within the role
    const int n = blockIdx.x, hv = blockIdx.y, v0 = blockIdx.z * VT;
    init_stage_barriers(full, empty, kStages, kConsumers, kForm ? formed : nullptr, kRole);
    wait_for_previous_kernel();  // prepare's operands, the pieces' start states (launch_scan_grid)
    const ScanChain ch(p.seqs[n], hv, p);
    const int nchunks = ch.chunks();
    const bool raw = p.qk_rowf != nullptr;
    // kForm forms U, and W from raw k or from prepare's K⊙γ (FwdParams::Kg; else W is prepare's)
    const bool form_w = kForm && (raw || p.Kg);
    const bool w_from_k = kForm && raw;  // W's tile gets no copy: the forming warps make K⊙γ there

    // Every operand of chunk c into stage c % kStages by the copy engine, once every consumer warp is
    // done with the stage's previous chunk (the concurrent forward: once prepare has published them),
    // landing on the stage's `full` barrier; by one thread, chunks in order. Raw input rows past the
    // sequence's end are the next sequence's (or zero past the tensor): the chunk's users zero them in
    // k and v (see below); prepare's rows there are zero.
    auto issue_chunk = [&](int c) {
        constexpr uint32_t kRowTile = uint32_t(L::row_tile), kBlock = kChunk * RowT::kRowBytes;
        const uint32_t bytes = (p.o ? kRowTile + uint32_t(L::p_tile) : 0) + kRowTile + uint32_t(L::v_tile) + K * 4 +
                               (kDelta && !w_from_k ? kRowTile : 0) + (kForm ? uint32_t(L::p_tile) : 0) +
                               (raw ? kRowf * kChunk * 4 : 0);
        const size_t slot = ch.slot(c);
        const int b = c % kStages;
        if (c >= kStages) tma::mbar_wait(empty + b, (c / kStages - 1) & 1);
        if constexpr (kConcurrent) {
            wait_ready(p.ready + slot);
            tma::fence_proxy_global();
        }
        uint64_t* bar = full + b;
        tma::mbar_expect(bar, bytes);
        const int row = int(slot * kChunk);                         // in the [slots·64, D] maps
        const int t0 = ch.si.start + c * kChunk, batch = ch.si.batch;  // in the raw inputs
        for (int kb = 0; kb < K / 64; ++kb) {
            if (p.o) {  // the output's own operands (the backward's recompute writes no output)
                if (raw) tma::load_4d(Qt_of(b) + kb * kBlock, &maps.q, 64 * kb, ch.h, t0, batch, bar);
                else tma::load_2d(Qt_of(b) + kb * kBlock, &maps.Qg, 64 * kb, row, bar);
            }
            if (raw) tma::load_4d(Kt_of(b) + kb * kBlock, &maps.k, 64 * kb, ch.h, t0, batch, bar);
            else tma::load_2d(Kt_of(b) + kb * kBlock, &maps.Kd, 64 * kb, row, bar);
            if (kDelta && !w_from_k)  // W, or the K⊙γ it is formed from
                tma::load_2d(Wt_of(b) + kb * kBlock, &maps.W, 64 * kb, row, bar);
        }
        if (p.o) tma::load_2d(Pt_of(b), &maps.P, 0, row, bar);
        if constexpr (kForm) tma::load_2d(Tt_of(b), &maps.T, 0, row, bar);
        if (kForm || (!kDelta && raw)) tma::load_4d(Ut_of(b), &maps.v, v0, ch.hv, t0, batch, bar);
        else tma::load_2d(Ut_of(b), &maps.U, v0, row, bar);
        tma::load_bytes(gcs + b * K, p.gC + slot * K, K * 4, bar);
        if (raw)
            tma::load_bytes(rfs + b * kRowf * kChunk, p.qk_rowf + slot * kRowFactorRows * kChunk,
                            kRowf * kChunk * 4, bar);
    };
    if (warp == ScanWs<kForm>::kProducerWarp) {
        if (lane == 0)
            for (int c = 0; c < nchunks; ++c) issue_chunk(c);
        return;
    }

    if constexpr (kForm) {
        if (warp >= 8) {
            // ---- the forming warpgroup: chunk c's U = T V and W = T (K⊙γ), in place of V and K⊙γ.
            // U's product first, K⊙γ formed while it runs (session 14: the scaling used to come first,
            // and with two stages each chunk's forming lies on the scan's critical path), then W's
            // column blocks in one batch (not all three at once: fewer live accumulators) ----
            constexpr uint32_t kBlock = kChunk * RowT::kRowBytes;
            for (int c = 0; c < nchunks; ++c) {
                const int sb = c % kStages;
                unsigned char *const Kt = Kt_of(sb), *const Wt = Wt_of(sb), *const Ut = Ut_of(sb);
                const float* phi = rfs + (sb * kRowf + kRowPhi) * kChunk;  // e^{b_i}/‖k_i‖, 0 past the end
                tma::mbar_wait(full + sb, (c / kStages) & 1);
                // raw rows past the sequence's end are the next sequence's: zero in k (read by the
                // state update too) and v, before anything reads them
                const int valid = ch.rows(c);
                if (valid < kChunk) {  // (the same for every thread of the warpgroup)
                    if (raw) zero_rows_swz<64, K>(Kt, valid, rt, kRole);  // (prepare's Kd rows there are zero)
                    zero_rows_swz<VT, VT>(Ut, valid, rt, kRole);
                    wg::fence_proxy_async();
                    named_bar_sync(kBarForm, kRole);  // the zeroed rows in place
                }
                float uacc[1][NT][4];
                wg::fence();
                wg::rows_product<4>(uacc[0], Tt_of(sb), Ut, false);
                wg::commit();
                // K⊙γ = diag(φ) k into W's tile, rounded once to bf16 (as prepare does)
                // (prepare's K⊙γ, FwdParams::Kg, arrives in W's tile)
                if (w_from_k) scale_rows_swz<64, K, kChunk, kRole>(Wt, Kt, phi, 0, valid, rt);
                wg::wait<0>();
                wg::fence_acc(uacc);
                wg::fence_proxy_async();
                named_bar_sync(kBarForm, kRole);  // K⊙γ in place; every warp's product has read V
                for_each_acc_pair(uacc, [&](int r, int col, float& x0, float& x1) {
                    *reinterpret_cast<uint32_t*>(Ut + ColT::template elem<kChunk>(16 * mw + r, col)) =
                        pack2(__float2bfloat16(x0), __float2bfloat16(x1));
                });
                if (form_w) {
                    float wacc[K / 64][1][8][4];
                    wg::fence();
#pragma unroll
                    for (int kb = 0; kb < K / 64; ++kb)
                        wg::rows_product<4>(wacc[kb][0], Tt_of(sb), Wt + kb * kBlock, false);
                    wg::commit();
                    wg::wait<0>();
#pragma unroll
                    for (int kb = 0; kb < K / 64; ++kb) wg::fence_acc(wacc[kb]);
                    named_bar_sync(kBarForm, kRole);  // every warp's products have read K⊙γ
#pragma unroll
                    for (int kb = 0; kb < K / 64; ++kb)
                        for_each_acc_pair(wacc[kb], [&](int r, int col, float& x0, float& x1) {
                            *reinterpret_cast<uint32_t*>(Wt + RowT::template elem<kChunk>(16 * mw + r, 64 * kb + col)) =
                                pack2(__float2bfloat16(x0), __float2bfloat16(x1));
                        });
                }
                wg::fence_proxy_async();  // W and U are read by the other warpgroups' products
                tma::mbar_arrive(formed + sb);
            }
            return;
        }
    }

    // state warps: keys 16·mw + 64·i (+ the fragment's row), all VT columns
    float S[SMT][NT][4];
    const int key0 = 16 * mw;
    if (state_role) {
        load_initial_state<SMT, NT, 64>(S, p, n, hv, key0, v0);
        store_state_swz<K, VT>(S, Sbuf, mw);
    }
    const bool o_pairs = output_pairs<E>(p);
    float acc[1][NT][4];  // W S (state warps) or O (output warps)
    zero_acc(acc);

    // kForm: the copies are issued by the output warpgroup's first thread: every stage's first chunk
    // now, then chunk c + kStages as soon as every consumer warp is done with chunk c (its stage):
    // right after the output warps' own release, before their stores of o. Issued by the forming
    // warps instead, the copies of chunk c + 1 waited until chunk c was formed, and the scan took
    // ~4 µs a chunk instead of ~2.9 (GDN B=4 T=4096, two stages, ncu); issued at the top of the next
    // chunk, after those stores, the GDN scan took 217 µs instead of 205 (KDA's 190 instead of 177):
    // with two stages each chunk's copies and forming lie on the scan's critical path.
    const bool issuer = kForm && tid == kRole;
    if (issuer)
        for (int c = 0; c < kStages && c < nchunks; ++c) issue_chunk(c);
    for (int cidx = 0; cidx < nchunks; ++cidx) {
        const int b = cidx & 1;         // state buffer
        const int sb = cidx % kStages;  // operand stage
        unsigned char* const Ut = Ut_of(sb);
        const float* fq = rfs + (sb * kRowf + kRowFq) * kChunk;  // raw operands: s/‖q_i‖·e^{b_i}
        const float* fk = rfs + (sb * kRowf + kRowFk) * kChunk;  // and e^{b_C − b_i}/‖k_i‖
        unsigned char* const Sop = Sbuf + b * L::s_tile;  // the chunk's start state
        // chunk cidx's operands landed (kForm: and W, U are formed)
        tma::mbar_wait((kForm ? formed : full) + sb, (cidx / kStages) & 1);
        if (!kForm && raw && !state_role && ch.rows(cidx) < kChunk) {
            zero_rows_swz<64, K>(Kt_of(sb), ch.rows(cidx), rt, kRole);
            if constexpr (!kDelta) zero_rows_swz<VT, VT>(Ut, ch.rows(cidx), rt, kRole);
        }
        wg::fence_proxy_async();                // the state tile (and zeroed rows) are read by the products next
        named_bar_sync(kBarChunk, kConsumers);  // chunk cidx's operands and its start state are in place
        if (state_role) {
            // the backward's recompute keeps the chunk's start state (as the products see it)
            if (p.states)
                store_acc<E, SMT, NT, 64>(S, static_cast<E*>(p.states) + ch.slot(cidx) * K * p.V + size_t(key0) * p.V + v0,
                                          p.V);
            unsigned char* Ueff = Ut;
            if constexpr (kDelta) {
                // W S, then Ũ = U − W S (and diag(fk) Ũ) of the warp's 16 rows
                wg::fence();
                wg::rows_product<KS>(acc[0], Wt_of(sb), Sop, false);
                wg::finish(acc);
                // every load before the first store: the compiler cannot tell the tiles apart and
                // would otherwise wait out each load's latency in turn (~1000 cycles a chunk, trace)
                const int g = lane >> 2, t4 = lane & 3;
                float2 u[2][NT];
                float f[2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    f[hh] = raw ? fk[16 * mw + g + 8 * hh] : 1.f;
#pragma unroll
                    for (int j = 0; j < NT; ++j)
                        u[hh][j] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                            Ut + ColT::template elem<kChunk>(16 * mw + g + 8 * hh, 8 * j + 2 * t4)));
                }
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const uint32_t at = ColT::template elem<kChunk>(16 * mw + g + 8 * hh, 8 * j + 2 * t4);
                        const float u0 = u[hh][j].x - acc[0][j][2 * hh], u1 = u[hh][j].y - acc[0][j][2 * hh + 1];
                        *reinterpret_cast<uint32_t*>(Unew + at) = pack2(__float2bfloat16(u0), __float2bfloat16(u1));
                        if (raw)
                            *reinterpret_cast<uint32_t*>(Uk + at) =
                                pack2(__float2bfloat16(u0 * f[hh]), __float2bfloat16(u1 * f[hh]));
                    }
                wg::fence_proxy_async();
                named_bar_arrive(kBarU, kConsumers);  // the output warps may read Ũ
                Ueff = Unew;
            } else if (raw) {
                // diag(fk) V of the warp's 16 rows (rows past the end: zero, as the output warps made them)
                scale_rows_swz<VT, VT, 16, 32>(Uk, Ut, fk, 16 * mw, ch.rows(cidx), lane);
                wg::fence_proxy_async();
            }
            named_bar_sync(kBarState, kRole);  // every row of Ũ (diag(fk) Ũ) is written
            // ---- S ← diag(γ_C) S + Kdᵀ Ũ, into the other state buffer ----
            scale_acc_rows<SMT, NT, 64>(S, gcs + sb * K + key0);
            const unsigned char* Bt = raw ? Uk : Ueff;
            wg::fence();
            wg::cols_product(S, Kt_of(sb), Bt);
            wg::finish(S);
            tma::release_stage(empty + sb);
            store_state_swz<K, VT>(S, Sbuf + (b ^ 1) * L::s_tile, mw);
        } else {
            // ---- O = Qg S + P Ũ, rows [16·mw, +16) ----
            if (p.o) {
                wg::fence();
                wg::rows_product<KS>(acc[0], Qt_of(sb), Sop, false);
                wg::finish(acc);
                if (raw) scale_acc_rows(acc, fq + mw * 16);
            }
            if constexpr (kDelta) named_bar_sync(kBarU, kConsumers);  // Ũ from the state warps
            if (p.o) {
                wg::fence();
                wg::rows_product<kChunk / 16>(acc[0], Pt_of(sb), kDelta ? Unew : Ut, true);
                wg::finish(acc);
            }
            tma::release_stage(empty + sb);
            if (issuer && cidx + kStages < nchunks) issue_chunk(cidx + kStages);
            if constexpr (kForm) __syncwarp();  // the issuing lane rejoins its warp
            if (p.o) store_output_tile<E, NT>(acc, p, ch, cidx, mw * 16, v0, o_pairs);
            // Orders nothing (see the racecheck note above the kernel); free, as the chunk barrier is next.
            if constexpr (!kDelta) named_bar_sync(kBarOutput, kRole);
        }
    }
    if (state_role) store_final_state<SMT, NT, 64>(S, p, n, hv, key0, v0);
}

// ---- parallel pieces (additive update, bf16 operands) ------------------------------------------
//
// With the additive update the state is linear in the tokens: the state after a run of chunks is
// diag(Γ) S_0 + L, with Γ the product of the chunks' γ_C and L the state the run leaves from a zero
// start. So a sequence cut into P pieces needs no piece to wait for the one before: each piece's
// start state is the previous start state carried over the previous piece, and that carry-over (Γ,
// L of every run of a piece) is a product with no chain through the output: every run of every
// piece at once (chunk_run_state_kernel), then the start states in one cheap pass
// (chunk_piece_start_kernel), then one scan over every piece together, each from its own start.
// At B=1 the warp-specialised scan otherwise walks 256 chunks on 16-column tiles that re-read every
// K-wide operand 8 times; in pieces it walks 64 on 64-column tiles, the grid it has at B=4.

// The runs of the state pass and the pieces' start states, in the workspace.
struct PieceParams {
    const SeqInfo* runs;          // a run: whole chunks of one piece of one sequence, like a sequence entry
    const int* piece_run_first;   // runs of piece-table entry e (piece i, sequence n: e = i·N + n) are
                                  // [piece_run_first[e], piece_run_first[e + 1]), for the pieces but the last
    float* run_L;                 // per (run, value head): L, fp32 [K, V]
    float* run_gamma;             // and Γ, fp32 [K]
    float* piece_start;           // per (piece-table entry, value head): the start state, fp32 [K, V]
    int n_seqs, pieces;
};

constexpr int kRunThreads = 256;
constexpr int kRunBlocksPerSM = 2;
// A run is every piece's 1/n, n = the runs that keep the grid within one wave of kRunBlocksPerSM
// blocks an SM (B=1, H=16, 4 pieces: 5 runs of 12–13 chunks a piece, 240 blocks on 132 SMs).

// Three operand stages (each chunk's copies issued two chunks ahead); raw v is scaled by fk in place.
template <int K, int V>
struct RunLayout {
    static constexpr int kStages = 3;
    static constexpr int LDK = K + 8, LDV = V + 8;
    static constexpr size_t stage = size_t(kChunk) * LDK + size_t(kChunk) * LDV;  // Kd (k), U (v)
    static constexpr size_t elems = kStages * stage;
    static constexpr size_t bytes = elems * 2 + kStages * (K + kChunk) * sizeof(float);  // + γ_C, fk
};

// One block per (run, value head): S ← diag(γ_C) S + Kdᵀ U over the run's chunks from S = 0, the state
// warps' update of chunk_scan_ws_kernel (same operands, raw or prepared, same bf16 rounding of
// diag(fk) V) on the head's whole V; L and Γ to the workspace. 8 warps: warp w owns key rows
// [16·(w % (K/16)), +16) and columns [(w / (K/16))·VW, +VW), VW = V·K/128 (all of V at K = 128).
template <int K, int V>
__global__ void __launch_bounds__(kRunThreads) chunk_run_state_kernel(const FwdParams p, const PieceParams pp) {
    using E = __nv_bfloat16;
    using L = RunLayout<K, V>;
    constexpr int LDK = L::LDK, LDV = L::LDV;
    constexpr int MW = K / 16, CW = (kRunThreads / 32) / MW, VW = V / CW, NT = VW / 8;
    static_assert(MW * CW == kRunThreads / 32 && NT % 2 == 0, "chunk_run_state: warps must tile [K, V]");
    constexpr int kStages = L::kStages;
    extern __shared__ float4 smem_f4[];
    E* stage = reinterpret_cast<E*>(smem_f4);                          // kStages × (Kd, U)
    float* gcs = reinterpret_cast<float*>(stage + kStages * L::stage);  // kStages × γ_C
    float* fks = gcs + kStages * K;                                    // kStages × fk
    auto Kt_of = [&](int b) { return stage + b * L::stage; };
    auto Ut_of = [&](int b) { return stage + b * L::stage + kChunk * LDK; };

    const int tid = threadIdx.x, warp = tid >> 5;
    const int key0 = (warp % MW) * 16, col0 = (warp / MW) * VW;
    const int r = blockIdx.x, hv = blockIdx.y;
    allow_dependent_launch();    // chunk_piece_start_kernel may take the SMs this pass leaves
    wait_for_previous_kernel();  // prepare's γ_C and row factors
    const ScanChain ch(pp.runs[r], hv, p);
    const int nchunks = ch.chunks();
    const bool raw = p.qk_rowf != nullptr;

    auto fetch = [&](int cidx) {
        const size_t slot = ch.slot(cidx);
        const int b = cidx % kStages;
        copy_update_operands<E, K, V, kRunThreads>(Kt_of(b), LDK, Ut_of(b), LDV, gcs + b * K, p, ch, cidx, 0, raw, raw,
                                                   tid);
        if (raw)
            for (int c = tid; c < kChunk / 4; c += kRunThreads)
                cp_async16(fks + b * kChunk + 4 * c, p.qk_rowf + (slot * kRowFactorRows + kRowFk) * kChunk + 4 * c);
    };

    float S[1][NT][4];
    zero_acc(S);
    float gamma = 1.f;  // thread t < K: Γ of key t
    copy_ring_start<kStages>(fetch, nchunks);
    for (int cidx = 0; cidx < nchunks; ++cidx) {
        const int b = cidx % kStages;
        copy_ring_wait<kStages>();
        __syncthreads();  // chunk cidx's operands are in place; the stage of chunk cidx − 1 is free
        copy_ring_refill<kStages>(fetch, cidx, nchunks);
        E* Ut = Ut_of(b);
        if (raw) {
            scale_rows_into<E, kChunk, V>(Ut, Ut, LDV, fks + b * kChunk, tid, kRunThreads);  // each thread its own bytes
            __syncthreads();
        }
        scale_acc_rows(S, gcs + b * K + key0);
        warp_gemm<E, 1, NT>(S, Tile<E>{Kt_of(b) + key0, 1, LDK}, Tile<E>{Ut + col0, LDV, 1}, kChunk);
        if (tid < K) gamma *= gcs[b * K + tid];
    }
    const size_t out = size_t(r) * p.HV + hv;
    float* Lr = pp.run_L + out * K * V;
    for_each_acc_pair(S, [&](int rr, int c, float& x0, float& x1) {
        *reinterpret_cast<float2*>(Lr + (key0 + rr) * V + col0 + c) = make_float2(x0, x1);
    });
    if (tid < K) pp.run_gamma[out * K + tid] = gamma;
}

// One thread per (sequence, value head, state element): the start state of every piece, from the
// caller's initial state (or zero) through Γ, L of the runs of every piece but the last.
template <int K, int V>
__global__ void chunk_piece_start_kernel(const FwdParams p, const PieceParams pp) {
    allow_dependent_launch();    // the scan may take the SMs this kernel leaves
    wait_for_previous_kernel();  // the runs' Γ, L
    const int n = blockIdx.x / p.HV, hv = blockIdx.x % p.HV;
    const int e = blockIdx.y * blockDim.x + threadIdx.x;
    if (e >= K * V) return;
    const int key = e / V, col = e % V;
    float s = 0.f;
    if (p.h0) s = static_cast<const float*>(p.h0)[n * p.h0s[0] + hv * p.h0s[1] + key * p.h0s[2] + col];
    constexpr size_t kv = size_t(K) * V;
    for (int i = 0; i < pp.pieces; ++i) {
        const int entry = i * pp.n_seqs + n;
        pp.piece_start[(size_t(entry) * p.HV + hv) * kv + e] = s;
        if (i + 1 == pp.pieces) break;
        for (int r = pp.piece_run_first[entry]; r < pp.piece_run_first[entry + 1]; ++r) {
            const size_t out = size_t(r) * p.HV + hv;
            s = pp.run_gamma[out * K + key] * s + pp.run_L[out * kv + e];
        }
    }
}

// ---- host side --------------------------------------------------------------------------------

int sm_count();
// The chunked forward and backward copy their chunk tables from host memory on every call, which a
// CUDA graph cannot replay: under stream capture (of hla's stream) they stop with this error before
// touching the stream, and the caller's capture stays intact.
void refuse_graph_capture(const char* op);
// The tuning switches (tests and A/B timing; any other value is an error naming the variable):
// HLA_CUDA_SCAN_VT = 16 | 32 | 64, 0 when unset;
int scan_tile_override();
// HLA_CUDA_FWD_RAW = 0: the scan never takes raw operands (forward_chunked_impl); 1 or unset (−1): the
// default policy.
int raw_operands_override();
// HLA_CUDA_FWD_FORM = 0: the single-shot delta rule's scan reads prepare's W and U instead of forming
// them (FwdParams::Tw); 1 or unset (−1): the default policy.
int fwd_form_override();

// The value-column tile of a scan over `chains` (sequence, value head) pairs with operand dtype E, for
// the forward scan and the backward's reverse dS scan alike. Every block walks its whole sequence. Each
// V-tile block re-reads the chunk's operands, so narrow tiles cost L2 bandwidth (ncu: 83% of L2
// throughput at 32 columns, B=4 T=4096), while too few blocks leave SMs idle: the scan's time is one
// chunk's latency times the chunks in a sequence.
// bf16 operands (the warp-specialised scan, 112–213 KiB at K = 128: one block per SM): the widest tile
// of 64, 32, 16 columns that still gives 90% of the SMs a block (B=4, H=16: 64; B=1: 16). fp32
// (161–214 KiB at K = 128, two blocks per SM at K = 64): 16 columns while that stays within one wave,
// else 32.
// HLA_CUDA_SCAN_VT = 16 | 32 | 64 overrides the choice (tests and tuning).
template <class E>
int scan_tile_width(int64_t chains, int64_t V) {
    int vt = 16;
    if constexpr (sizeof(E) == 2) {
        for (int w : {64, 32})
            if (w <= V && chains * (V / w) * 10 >= 9 * int64_t(sm_count())) {
                vt = w;
                break;
            }
    } else {
        vt = chains * (V / 16) > 2 * sm_count() ? 32 : 16;
    }
    if (const int forced = scan_tile_override()) vt = forced;
    return std::min<int>(vt, int(V));
}
void* workspace_alloc(size_t bytes, const char* op);
void workspace_free(void* ptr);  // stream-ordered (the launch stream); null is a no-op

// A workspace freed when it leaves scope (an exception included) unless released to the caller.
class ScopedWorkspace {
public:
    ScopedWorkspace() = default;
    explicit ScopedWorkspace(void* p) : p_(p) {}
    ScopedWorkspace(const ScopedWorkspace&) = delete;
    ScopedWorkspace& operator=(const ScopedWorkspace&) = delete;
    ~ScopedWorkspace() { workspace_free(p_); }
    void reset(void* p) {
        workspace_free(p_);
        p_ = p;
    }
    char* get() const { return static_cast<char*>(p_); }
    void* release() {
        void* p = p_;
        p_ = nullptr;
        return p;
    }

private:
    void* p_ = nullptr;
};

// The piecewise forward (forward_chunked_impl): HLA_CUDA_FWD_PIECES = P ≥ 1 forces P pieces (1 is the
// single-shot path), 0 when unset.
int fwd_pieces_override();
// The concurrent forward (forward_chunked_impl): HLA_CUDA_FWD_CONCURRENT = 0 turns it off, 1 forces it;
// −1 when unset.
int fwd_concurrent_override();
// False where kernels of different streams may run one at a time: the environment says so
// (kernels_serialised_by_environment: CUDA_LAUNCH_BLOCKING=1, a profiler), or a device without
// concurrent kernels.
// (compute-sanitizer sets no such variable and runs the two kernels at once: memcheck is clean on the
// concurrent tests.)
bool kernels_run_concurrently();
// Per device, created once (piece_streams): the stream the piecewise forward's scans run on
// (non-blocking, the device's greatest priority, so that a scan's blocks take SMs as soon as prepare
// blocks leave them) and three events: a piece's prepare done (its scan waits), the previous piece's
// scan done (the next prepare waits) and the join. `mu` keeps one forward at a time on them: with two
// host threads interleaving, a scan could wait on the other thread's prepare.
struct PieceStreams {
    cudaStream_t scan = nullptr;
    cudaEvent_t ready = nullptr, scanned = nullptr, done = nullptr;
    std::mutex mu;
};
// However the block holding it is left, the caller's stream waits for every scan queued on ps.scan: a
// throw between two launches must not return while a scan still writes the caller's o or final state
// (or reads the workspace, released on the caller's stream). The normal exit calls join, which checks
// the calls' errors and disarms this.
struct JoinScans {
    PieceStreams& ps;
    cudaStream_t caller;
    bool armed = true;
    void join(const char* op) {
        // disarmed only once joined: if a call throws, the destructor still tries (the workspace the
        // scans read is freed on the caller's stream after it)
        check_cuda(cudaEventRecord(ps.done, ps.scan), op, "cudaEventRecord(scans done)");
        check_cuda(cudaStreamWaitEvent(caller, ps.done, 0), op, "cudaStreamWaitEvent(scans done)");
        armed = false;
    }
    ~JoinScans() {
        if (!armed) return;
        cudaEventRecord(ps.done, ps.scan);
        cudaStreamWaitEvent(caller, ps.done, 0);
    }
};
inline PieceStreams& piece_streams(const char* op) {
    // inline: one set of statics for the program, whichever fwd_<dtype>.cu calls first
    static std::mutex init;
    // Never destroyed: the streams and events live as long as the process (destroying them at exit
    // could run after the CUDA runtime has shut down).
    static std::vector<PieceStreams*> per_device;
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
    std::lock_guard<std::mutex> lock(init);
    if (per_device.size() <= size_t(dev)) per_device.resize(size_t(dev) + 1, nullptr);
    if (!per_device[dev]) {
        auto* ps = new PieceStreams;
        int least = 0, greatest = 0;
        check_cuda(cudaDeviceGetStreamPriorityRange(&least, &greatest), op, "cudaDeviceGetStreamPriorityRange");
        check_cuda(cudaStreamCreateWithPriority(&ps->scan, cudaStreamNonBlocking, greatest), op,
                   "cudaStreamCreateWithPriority(piece scans)");
        check_cuda(cudaEventCreateWithFlags(&ps->ready, cudaEventDisableTiming), op, "cudaEventCreate(piece ready)");
        check_cuda(cudaEventCreateWithFlags(&ps->scanned, cudaEventDisableTiming), op, "cudaEventCreate(piece scanned)");
        check_cuda(cudaEventCreateWithFlags(&ps->done, cudaEventDisableTiming), op, "cudaEventCreate(pieces done)");
        per_device[dev] = ps;
    }
    return *per_device[dev];
}

template <class In, class E, Decay D, Update Up, int K>
void launch_prepare_fp32(const FwdParams& fp, int n_chunks, const char* op) {
    constexpr size_t smem = prep_smem_bytes<D, Up, K>();
    static_assert(smem <= 227 * 1024, "chunk_prepare: shared memory over the 227 KiB of an SM");
    raise_smem_limit<chunk_prepare_kernel<In, E, D, Up, K>>(smem, op);
    chunk_prepare_kernel<In, E, D, Up, K><<<dim3(n_chunks, fp.HV), kPrepThreads, smem, launch_stream()>>>(fp);
    check_cuda(cudaGetLastError(), op, "chunk_prepare launch");
}

// bf16 inputs and intermediates take the tensor-core prepare of chunk_prepare_mma.cuh, the only one
// that reads FwdParams::prep_order; other dtypes the fp32 kernel.
template <class In, class E>
constexpr bool kTensorCorePrepare = std::is_same_v<In, __nv_bfloat16> && std::is_same_v<E, In>;

template <class In, class E, Decay D, Update Up, int K>
void launch_prepare(const FwdParams& fp, int n_chunks, const char* op, bool load_only) {
    if constexpr (kTensorCorePrepare<In, E>) {
        return launch_prepare_mma<D, Up, K>(fp, n_chunks, op, load_only);
    } else {
        if (load_only) return;  // (the concurrent forward is bf16 only)
        launch_prepare_fp32<In, E, D, Up, K>(fp, n_chunks, op);
    }
}

// Kernel over (sequences, value heads, V-tiles of vt columns) on `stream`, its shared-memory limit
// raised first: the launch of either scan.
// On the stream of the kernel that wrote its operands (after_kernel), as a programmatic dependent
// launch: its blocks take the SMs that kernel's last wave leaves, then wait for it.
// Tensor maps (tma.cuh) of the scans' bf16 operands: prepare's per-chunk tiles as a [slots·64, cols]
// matrix, read in boxes of 64 rows × box_cols; an input [B, T, heads, D] view (any 16-byte strides)
// in boxes of one head's 64 rows × box_cols.
inline void encode_slot_rows(CUtensorMap* map, const void* base, size_t slots, int cols, int box_cols, const char* op) {
    const uint64_t dims[2] = {uint64_t(cols), uint64_t(slots) * kChunk}, strides[1] = {uint64_t(cols) * 2};
    const uint32_t box[2] = {uint32_t(box_cols), uint32_t(kChunk)};
    tma::encode_bf16(map, base, 2, dims, strides, box, op);
}
// The 4-D geometry of a bf16 [B, T, heads, D] view for a map (innermost first: sizes, byte strides).
struct InputRows {
    uint64_t dims[4], strides[3];
};
inline InputRows input_row_geometry(const TensorView& x) {
    // a dimension of size 1 takes the nested stride whatever its own (never stepped over)
    const int64_t s2 = x.shape[2] == 1 ? x.shape[3] : x.stride[2];
    const int64_t s1 = x.shape[1] == 1 ? s2 * x.shape[2] : x.stride[1];
    const int64_t s0 = x.shape[0] == 1 ? s1 * x.shape[1] : x.stride[0];
    return {{uint64_t(x.shape[3]), uint64_t(x.shape[2]), uint64_t(x.shape[1]), uint64_t(x.shape[0])},
            {uint64_t(s2) * 2, uint64_t(s1) * 2, uint64_t(s0) * 2}};
}
inline void encode_input_rows(CUtensorMap* map, const TensorView& x, int box_cols, const char* op) {
    const InputRows g = input_row_geometry(x);
    const uint32_t box[4] = {uint32_t(box_cols), 1, uint32_t(kChunk), 1};
    tma::encode_bf16(map, x.data, 4, g.dims, g.strides, box, op);
}

// The tensor maps of a warp-specialised scan on vt-column tiles (ScanMaps), for the workspace's
// `slots` (chunk, value head) slots at fp's pointers.
inline ScanMaps make_scan_maps(const LinearForwardArgs& a, const FwdParams& fp, bool delta, int vt, size_t slots,
                               const char* op) {
    ScanMaps m{};
    if (slots == 0) return m;  // no chunk: the scan blocks never copy (and an empty map cannot be encoded)
    if (fp.Qg) encode_slot_rows(&m.Qg, fp.Qg, slots, fp.K, 64, op);
    if (fp.Kd) encode_slot_rows(&m.Kd, fp.Kd, slots, fp.K, 64, op);
    if (fp.W) encode_slot_rows(&m.W, fp.W, slots, fp.K, 64, op);
    if (fp.Kg) encode_slot_rows(&m.W, fp.Kg, slots, fp.K, 64, op);  // (never both)
    encode_slot_rows(&m.P, fp.P, slots, kChunk, 64, op);
    if (fp.U) encode_slot_rows(&m.U, fp.U, slots, fp.V, vt, op);
    if (fp.Tw) encode_slot_rows(&m.T, fp.Tw, slots, kChunk, 64, op);
    if (fp.qk_rowf) {  // raw operands
        encode_input_rows(&m.q, a.q, 64, op);
        encode_input_rows(&m.k, a.k, 64, op);
    }
    if ((fp.qk_rowf && !delta) || fp.Tw) encode_input_rows(&m.v, a.v, vt, op);
    return m;
}

template <auto Kernel, class... Extra>
void launch_scan_grid(const FwdParams& fp, int n_seqs, int vt, int threads, size_t smem, cudaStream_t stream,
                      bool after_kernel, const char* op, const char* what, const Extra&... extra) {
    raise_smem_limit<Kernel>(smem, op);
    check_cuda(launch_kernel(Kernel, dim3(n_seqs, fp.HV, fp.V / vt), dim3(threads), smem, stream, after_kernel, fp,
                             extra...),
               op, what);
}

template <Update Up, int K, int VT>
void launch_scan(const FwdParams& fp, int n_seqs, const char* op, cudaStream_t stream, bool after_kernel) {
    constexpr size_t smem = ScanLayout<K, VT, Up == Update::Delta>::bytes;
    static_assert(smem <= 227 * 1024, "chunk_scan: shared memory over the 227 KiB of an SM");
    launch_scan_grid<chunk_scan_kernel<Up, K, VT>>(fp, n_seqs, VT, kScanThreads, smem, stream, after_kernel, op,
                                                   "chunk_scan launch");
}

// One instantiation of chunk_scan_ws_kernel: load_only (the concurrent forward) only loads it.
template <Update Up, int K, int VT, bool kConcurrent, bool kForm>
void launch_scan_ws_kernel(const FwdParams& fp, const ScanMaps& maps, int n_seqs, const char* op, cudaStream_t stream,
                           bool after_kernel, bool load_only) {
    constexpr size_t smem = ScanWsLayout<K, VT, Up == Update::Delta, kForm>::bytes;
    static_assert(smem <= 227 * 1024, "chunk_scan_ws: shared memory over the 227 KiB of an SM");
    constexpr auto kernel = chunk_scan_ws_kernel<Up, K, VT, kConcurrent, kForm>;
    if (load_only) return raise_smem_limit<kernel>(smem, op);
    launch_scan_grid<kernel>(fp, n_seqs, VT, ScanWs<kForm>::kThreads, smem, stream, after_kernel, op,
                             "chunk_scan_ws launch", maps);
}

template <Update Up, int K, int VT>
void launch_scan_ws(const FwdParams& fp, const ScanMaps& maps, int n_seqs, const char* op, cudaStream_t stream,
                    bool after_kernel, bool load_only) {
    if constexpr (Up == Update::Delta) {
        // the concurrent forward and the forming of W and U (never both): the delta rule only
        if (fp.ready)
            return launch_scan_ws_kernel<Up, K, VT, true, false>(fp, maps, n_seqs, op, stream, after_kernel, load_only);
        if (fp.Tw)
            return launch_scan_ws_kernel<Up, K, VT, false, true>(fp, maps, n_seqs, op, stream, after_kernel, load_only);
    }
    if (load_only) return;
    launch_scan_ws_kernel<Up, K, VT, false, false>(fp, maps, n_seqs, op, stream, after_kernel, false);
}

// Run-time cell and sizes → template parameters, in one place.
// load_only (the concurrent forward, FwdParams::ready set): only load the kernel and raise its limits,
// which must not happen while the other kernel already waits for it (see forward_chunked_impl).
template <class In, class E, int K>
void launch_prepare_cell(const Problem& p, const FwdParams& fp, int n_chunks, bool load_only = false) {
    const bool delta = p.delta();
    switch (p.cfg.decay) {
        case Decay::None:
            return delta ? launch_prepare<In, E, Decay::None, Update::Delta, K>(fp, n_chunks, p.op, load_only)
                         : launch_prepare<In, E, Decay::None, Update::Additive, K>(fp, n_chunks, p.op, load_only);
        case Decay::Fixed:
            return delta ? launch_prepare<In, E, Decay::Fixed, Update::Delta, K>(fp, n_chunks, p.op, load_only)
                         : launch_prepare<In, E, Decay::Fixed, Update::Additive, K>(fp, n_chunks, p.op, load_only);
        case Decay::Scalar:
            return delta ? launch_prepare<In, E, Decay::Scalar, Update::Delta, K>(fp, n_chunks, p.op, load_only)
                         : launch_prepare<In, E, Decay::Scalar, Update::Additive, K>(fp, n_chunks, p.op, load_only);
        case Decay::Vector:
            return delta ? launch_prepare<In, E, Decay::Vector, Update::Delta, K>(fp, n_chunks, p.op, load_only)
                         : launch_prepare<In, E, Decay::Vector, Update::Additive, K>(fp, n_chunks, p.op, load_only);
    }
}

template <class E, Update Up, int K>
void launch_scan_vt(const Problem& p, const FwdParams& fp, const ScanMaps& maps, int n_seqs, int vt,
                    cudaStream_t stream, bool after_kernel, bool load_only) {
    // bf16 operands: the warp-specialised scan, 16, 32 or 64 columns. fp32 operands: 16 or 32 columns
    // (fwd_scan_tile_width).
    if constexpr (sizeof(E) == 2) {
        if (vt == 64) return launch_scan_ws<Up, K, 64>(fp, maps, n_seqs, p.op, stream, after_kernel, load_only);
        if (vt == 32) return launch_scan_ws<Up, K, 32>(fp, maps, n_seqs, p.op, stream, after_kernel, load_only);
        return launch_scan_ws<Up, K, 16>(fp, maps, n_seqs, p.op, stream, after_kernel, load_only);
    } else {
        if (load_only) return;  // (the concurrent forward is bf16 only)
        if (vt >= 32) return launch_scan<Up, K, 32>(fp, n_seqs, p.op, stream, after_kernel);
        return launch_scan<Up, K, 16>(fp, n_seqs, p.op, stream, after_kernel);
    }
}

// The forward scan's tile, the width launched: scan_tile_width's, except that the delta rule on the
// warp-specialised scan takes 32 columns where that rule gives 16 (HLA_CUDA_SCAN_VT still forces a
// width), and fp32 operands at most 32 (launch_scan_vt: 64 would need 256 KiB of shared memory).
template <class E>
int fwd_scan_tile_width(int64_t chains, int64_t V, bool delta) {
    int vt = scan_tile_width<E>(chains, V);
    if (sizeof(E) == 2 && delta && vt == 16 && V >= 32 && scan_tile_override() == 0) vt = 32;
    return sizeof(E) == 2 ? vt : std::min(vt, 32);
}

// Over the first n_seqs entries of fp.seqs; after_kernel: the kernel before it on `stream` wrote its
// operands (a programmatic dependent launch, launch_scan_grid).
template <class E, int K>
void launch_scan_cell(const Problem& p, const FwdParams& fp, const ScanMaps& maps, int n_seqs, int vt,
                      cudaStream_t stream, bool after_kernel, bool load_only = false) {
    if (p.delta()) return launch_scan_vt<E, Update::Delta, K>(p, fp, maps, n_seqs, vt, stream, after_kernel, load_only);
    return launch_scan_vt<E, Update::Additive, K>(p, fp, maps, n_seqs, vt, stream, after_kernel, load_only);
}

// The parallel pieces' state pass: Γ, L of every run, then every piece's start state (bf16 operands).
template <int K, int V>
void launch_piece_starts(const FwdParams& fp, const PieceParams& pp, int n_runs, const char* op) {
    constexpr size_t smem = RunLayout<K, V>::bytes;
    static_assert(kRunBlocksPerSM * smem <= 227 * 1024, "chunk_run_state: kRunBlocksPerSM blocks an SM");
    // each after a kernel on the stream (prepare, then this pass): programmatic dependent launches
    if (n_runs > 0) {
        raise_smem_limit<chunk_run_state_kernel<K, V>>(smem, op);
        check_cuda(launch_kernel(chunk_run_state_kernel<K, V>, dim3(n_runs, fp.HV), dim3(kRunThreads), smem,
                                 launch_stream(), true, fp, pp),
                   op, "chunk_run_state launch");
    }
    constexpr int kThreads = 256;
    check_cuda(launch_kernel(chunk_piece_start_kernel<K, V>, dim3(pp.n_seqs * fp.HV, (K * V + kThreads - 1) / kThreads),
                             dim3(kThreads), 0, launch_stream(), true, fp, pp),
               op, "chunk_piece_start launch");
}

// The dtype of the intermediates and of the scan's matrix operands: that of the inputs, except fp16,
// whose 5-bit exponent cannot hold the factored scores and whose six roundings per output (Qg, Kd,
// W, U, P, S) measured 2.2× the error of the fp16 reference run (tolerance policy: 2×): fp16 inputs
// run the fp32 path.
template <class In>
using Intermediate = std::conditional_t<std::is_same_v<In, __half>, float, In>;

// Rows of a [B, T, heads, D] view that the scan's copy engine can read (bf16): 16-byte aligned rows
// and strides, and the dimensions nested the usual way (a row of D inside a token's heads inside a
// sequence; fused-projection views qualify), which cuTensorMapEncodeTiled requires of a map's strides.
// Other layouts (head-major views, for one) take prepare's copies.
// Dimensions of size 1 are never stepped over: their strides are not checked (encode_input_rows
// replaces them).
inline bool rows_tma_ready(const TensorView& x) {
    bool ok = reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.stride[3] == 1;
    // dimension d (0: B, 1: T, 2: heads) must step by a positive multiple of 8 elements, past the
    // extent of the dimensions inside it
    for (int d = 2; d >= 0; --d) {
        if (x.shape[d] == 1) continue;
        int64_t span = x.shape[3];  // the extent of what lies inside dimension d
        for (int e = d + 1; e < 3; ++e)
            if (x.shape[e] > 1) span = std::max(span, x.stride[e] * x.shape[e]);
        ok = ok && x.stride[d] > 0 && x.stride[d] % 8 == 0 && x.stride[d] >= span;
    }
    return ok;
}

// The chunked forward. With `states` (the backward's recompute), o and the final state are not
// written, the chunk-start states are, and with `keep` the workspace (prepare's per-chunk operands,
// which the backward's state-gradient scan reads too) is handed back with the parameters pointing into
// it instead of freed: the caller frees it (workspace_free) after its own kernels.
template <class In>
void* forward_chunked_impl(const Problem& p, void* states, FwdParams* keep) {
    using E = Intermediate<In>;
    const LinearForwardArgs& a = p.args;
    FwdParams fp{};
    fp.q = a.q.data;
    fp.k = a.k.data;
    fp.v = a.v.data;
    fp.g = a.g.defined() ? a.g.data : nullptr;
    fp.beta = a.beta.defined() ? a.beta.data : nullptr;
    fp.A_log = a.A_log.defined() ? a.A_log.data : nullptr;
    fp.dt_bias = a.dt_bias.defined() ? a.dt_bias.data : nullptr;
    fp.h0 = a.initial_state.defined() ? a.initial_state.data : nullptr;
    fp.o = states ? nullptr : a.o.data;
    fp.ht = a.final_state.defined() && !states ? a.final_state.data : nullptr;
    fp.states = states;
    fp.g_dtype = a.g.defined() ? a.g.dtype : DType::F32;
    fp.beta_dtype = a.beta.defined() ? a.beta.dtype : DType::F32;
    fp.o_dtype = a.o.dtype;
    fill_strides(fp.qs, a.q);
    fill_strides(fp.ks, a.k);
    fill_strides(fp.vs, a.v);
    fill_strides(fp.gs, a.g);
    fill_strides(fp.bs, a.beta);
    fill_strides(fp.os, a.o);
    fill_strides(fp.h0s, a.initial_state);
    fill_strides(fp.hts, a.final_state);
    fp.H = int(p.H);
    fp.HV = int(p.HV);
    fp.G = int(p.G);
    fp.K = int(p.K);
    fp.V = int(p.V);
    static_cast<CellOptions&>(fp) = cell_options(p.cfg, p.scale);

    // The forward of a cell with one decay number per token on bf16 inputs hands the scan q, k (and v
    // for the additive update) raw with per-row factors (FwdParams::qk_rowf); the backward's recompute
    // keeps prepare's Qg and Kd, which its own kernels read. The additive update saves prepare three
    // [T, K] writes (H100, one build, HLA_CUDA_FWD_RAW unset vs 0: simple GLA B=4 T=4096 0.358 -> 0.306
    // ms, B=1 T=16384 0.588 -> 0.560); the delta rule saves two, and since its scan forms diag(fk) Ũ
    // on the state warps of the warp-specialised scan it gains too (GDN B=4 T=4096 0.460 -> 0.436 ms;
    // on session 5's scan, where that product sat in every warp's chain, it was neutral to 6% slower).
    const bool raw = raw_operands_override() != 0 && !states &&
                     std::is_same_v<In, __nv_bfloat16> && p.cfg.decay != Decay::Vector && rows_tma_ready(a.q) &&
                     rows_tma_ready(a.k) && (p.delta() || rows_tma_ready(a.v));
    const int form_switch = fwd_form_override();  // read whatever the cell: a bad value is an error anyway

    // The scan's grid decides whether the forward runs in pieces. Single-shot, prepare runs over every
    // chunk with the whole GPU, then the scan: one block per (sequence, value head, V-tile), each
    // walking its chunks in order. When that grid leaves SMs idle or takes narrow tiles to fill them
    // (B=1: 16 chains), each sequence is cut into P pieces of whole chunks, in one of two ways.
    //
    // Parallel pieces (additive update, bf16 operands): every piece's start state comes from a state
    // pass over the earlier pieces that has no chain through the output (see chunk_run_state_kernel),
    // and then one scan walks every piece at once on 64-column tiles: P chosen so that this grid
    // fills the SMs as B·P sequences would.
    //
    // Sequential pieces (the delta rule, and fp32 operands): prepare of piece i runs on the caller's
    // stream after prepare i − 1 (and scan i − 2, see below), the scan of piece i on a second,
    // higher-priority stream once prepare i is done and the scan of piece i − 1 has written its state
    // (fp32 [N, HV, K, V] in the workspace, the next piece's initial state). The scans then take their
    // SMs as prepare blocks leave them and the later pieces' prepare runs on the SMs the scan leaves
    // idle: about prepare / P + scan instead of prepare + scan.
    //
    // HLA_CUDA_FWD_PIECES forces P for either way. The backward's recompute (`states`) stays
    // single-shot.
    int vt = fwd_scan_tile_width<E>(int64_t(p.N()) * p.HV, p.V, p.delta());
    int64_t max_chunks = 0;
    for (const Sequence& s : p.seqs) max_chunks = std::max<int64_t>(max_chunks, (s.len + kChunk - 1) / kChunk);
    int pieces = 1;
    const bool parallel_way = !states && !p.delta() && sizeof(E) == 2;
    const int wide = int(std::min<int64_t>(64, p.V));  // the parallel pieces' tile
    if (!states) {
        constexpr int kMinPieceChunks = 16;
        const int64_t most = std::max<int64_t>(max_chunks / kMinPieceChunks, 1);
        if (parallel_way) {
            pieces = int(std::clamp<int64_t>(sm_count() / (int64_t(p.N()) * p.HV * (p.V / wide)), 1, most));
        } else {
            // Each boundary costs a prepare wave's tail and the scan's restart (forced pieces at B=4
            // T=4096, where nothing overlaps: GDN +30 us at 2 pieces, +83 at 4), so few pieces pay
            // best. H100, bf16, H=16, K=V=128, B=1 T=16384, 1 / 2 / 3 / 4 / 8 pieces: GDN 0.752 / 0.696
            // / 0.690 / 0.699 / 0.746 ms, KDA 0.835 / 0.771 / 0.785 / 0.816 / 0.954.
            constexpr int kMaxPieces = 2;
            if (2 * int64_t(p.N()) * p.HV * (p.V / vt) <= sm_count()) pieces = int(std::min<int64_t>(most, kMaxPieces));
        }
        const int forced = fwd_pieces_override();
        if (forced >= 1) pieces = forced;
        pieces = int(std::clamp<int64_t>(pieces, 1, std::max<int64_t>(max_chunks, 1)));
    }
    // Concurrent (bf16 operands, instead of sequential pieces): prepare over every chunk on the caller's
    // stream and the scan on the second stream at the same time, in one piece; the scan waits for
    // each (chunk, value head) until prepare has published it (FwdParams::ready), and prepare takes the
    // chunks in the order the scans need them. No piece boundary (a prepare wave's tail and a scan
    // restart each), and the first chunks' prepare is all the scan waits for before it starts.
    // This needs the two kernels to run at the same time: prepare waits for nothing, and the scan's
    // blocks (at most half the SMs, a whole SM each) leave it the other SMs, but a scan grid that took
    // every SM, or kernels run one at a time, would leave the scan, launched first, waiting forever.
    // So only where the scan grid leaves half the SMs free, and not with CUDA_LAUNCH_BLOCKING=1 or
    // under a profiler that serialises kernels (kernels_serialised_by_environment; nsys, which sets
    // CUDA_INJECTION64_PATH too, then profiles the sequential pieces instead), whatever the switch; a
    // scan that still waits 10 s stops with an error (wait_ready). HLA_CUDA_FWD_CONCURRENT = 0 | 1
    // turns it off or forces it (also for sequences too short for pieces; the delta rule on bf16 inputs
    // only, the additive update taking parallel pieces); a forced piece count turns it off.
    const int concurrent_switch = fwd_concurrent_override();
    const bool scan_leaves_room = 2 * int64_t(p.N()) * p.HV * (p.V / vt) <= sm_count();
    const bool concurrent = !states && !parallel_way && sizeof(E) == 2 && fwd_pieces_override() == 0 &&
                            scan_leaves_room && (concurrent_switch == 1 || (concurrent_switch == -1 && pieces > 1)) &&
                            kernels_run_concurrently();
    if (concurrent) pieces = 1;
    const bool parallel = parallel_way && pieces > 1;
    // The single-shot delta rule on bf16 inputs: the scan forms U = T V itself from T = L diag(β)
    // (FwdParams::Tw) where it can read v's rows, and W = T (K⊙γ) too: prepare no longer reads v nor
    // writes U (nor W with raw operands), and the scan reads T instead (per token and head at
    // K = V = 128, bf16, raw operands: 128 bytes written and read instead of 512, and v read once
    // instead of twice). H100, GDN B=4 T=4096: 0.372 -> 0.324-0.343 ms (ncu: prepare 254 -> 168 µs,
    // the scan 184 -> 213 µs: two operand stages, each chunk's W and U formed after its copies land);
    // KDA (U only) 0.462-0.470 -> 0.440-0.448 ms. With vector decay prepare writes K⊙γ instead of W
    // (FwdParams::Kg: the same bytes) and the scan forms W from it, which moves W's product out of
    // KDA's prepare, the longer kernel (session 14, ncu: prepare 322 -> 291 µs, scan 176 -> 191 µs).
    // Not where the scan's chain sets the time (B=1 T=16384, the concurrent forward: 0.45 -> 0.68-0.71
    // ms; there the scan had three stages, the forming one two, and fewer, narrower blocks wait on
    // each chunk's copies and forming in turn). HLA_CUDA_FWD_FORM = 0 turns it off (measurement).
    const bool form = !states && std::is_same_v<E, __nv_bfloat16> && p.delta() && rows_tma_ready(a.v) &&
                      !concurrent && pieces == 1 && form_switch != 0;
    if (parallel && scan_tile_override() == 0) vt = wide;

    // Chunk table (host), then one workspace allocation holding the tables and the intermediates. The
    // chunks are ordered piece by piece (within a piece, sequence by sequence), so a piece's prepare is
    // one contiguous range of chunks and slots; the sequence table has one entry per (piece, sequence):
    // the piece's tokens of that sequence (possibly none) and its first chunk. With one piece these are
    // the single-shot tables.
    std::vector<ChunkInfo> chunks;
    std::vector<SeqInfo> seqs;
    std::vector<int> piece_first;  // first chunk of every piece, and the total
    for (int i = 0; i < pieces; ++i) {
        piece_first.push_back(int(chunks.size()));
        for (size_t n = 0; n < p.seqs.size(); ++n) {
            const Sequence& s = p.seqs[n];
            const int64_t nc = (s.len + kChunk - 1) / kChunk;
            const int64_t c0 = nc * i / pieces, c1 = nc * (i + 1) / pieces;
            const int64_t t0 = c0 * kChunk, t1 = std::min<int64_t>(c1 * kChunk, s.len);
            seqs.push_back({int(s.batch), int(s.start + t0), int(std::max<int64_t>(t1 - t0, 0)), int(chunks.size())});
            for (int64_t c = c0; c < c1; ++c)
                chunks.push_back({int(s.batch), int(s.start + c * kChunk),
                                  int(std::min<int64_t>(kChunk, s.len - c * kChunk)), int(n)});
        }
    }
    piece_first.push_back(int(chunks.size()));
    if (p.seqs.empty()) return nullptr;
    if (!states)
        record_forward_plan({.ran = true, .pieces = pieces, .parallel_pieces = parallel, .concurrent = concurrent,
                             .raw_operands = raw, .scan_forms_wu = form, .scan_tile = vt});
    // Parallel pieces: the runs of the state pass, every piece's but the last's chunks cut into
    // `split` runs of whole chunks (a run is a sequence entry of its own), as many as keep the pass
    // within one wave.
    std::vector<SeqInfo> runs;
    std::vector<int> piece_run_first;
    if (parallel) {
        const int64_t run_entries = int64_t(seqs.size() - p.seqs.size()) * p.HV;
        const int64_t split = std::max<int64_t>(1, kRunBlocksPerSM * sm_count() / run_entries);
        for (size_t e = 0; e + p.seqs.size() < seqs.size(); ++e) {
            piece_run_first.push_back(int(runs.size()));
            const SeqInfo& si = seqs[e];
            const int nc = (si.len + kChunk - 1) / kChunk;
            const int run_chunks = int(std::max<int64_t>(1, (nc + split - 1) / split));
            for (int c = 0; c < nc; c += run_chunks)
                runs.push_back({si.batch, si.start + c * kChunk, std::min(si.len - c * kChunk, run_chunks * kChunk),
                                si.first_chunk + c});
        }
        piece_run_first.push_back(int(runs.size()));
    }
    // Prepare's chunk order (FwdParams::prep_order). Concurrent: every sequence's c-th chunk before any
    // sequence's (c + 1)-th, as the scans need them. Single-shot on bf16 (the tensor-core prepare): the
    // reverse, so that the scan, which starts at every sequence's first chunk, finds the chunks prepare
    // wrote last still in L2.
    std::vector<int> prep_order;
    const bool reverse_order = !concurrent && pieces == 1 && kTensorCorePrepare<In, E>;
    if (concurrent || reverse_order)
        for (int64_t i = 0; i < max_chunks; ++i) {
            const int64_t c = reverse_order ? max_chunks - 1 - i : i;
            for (size_t n = 0; n < p.seqs.size(); ++n)
                if (c * kChunk < seqs[n].len) prep_order.push_back(seqs[n].first_chunk + int(c));
        }
    const size_t n_chunks = chunks.size();
    auto align = [](size_t x) { return (x + 255) & ~size_t(255); };
    const size_t slots = n_chunks * size_t(p.HV);
    // The host tables (chunks, sequence entries; parallel pieces: runs and the runs of every piece) as
    // one image at these offsets, copied to the workspace's start in one transfer.
    const size_t o_seqs = align(chunks.size() * sizeof(ChunkInfo));
    const size_t o_runs = o_seqs + align(seqs.size() * sizeof(SeqInfo));
    const size_t o_run_first = o_runs + align(runs.size() * sizeof(SeqInfo));
    const size_t o_order = o_run_first + align(piece_run_first.size() * sizeof(int));
    const size_t b_tables = o_order + align(prep_order.size() * sizeof(int));
    const size_t b_k = align(slots * kChunk * p.K * sizeof(E));  // one of Qg, Kd, W
    const size_t b_qk = raw ? 0 : b_k;
    const size_t b_u = (raw && !p.delta()) || form ? 0 : align(slots * kChunk * p.V * sizeof(E));
    const size_t b_w = p.delta() && !(form && raw) ? b_k : 0;
    const size_t b_tw = form ? align(slots * kChunk * kChunk * sizeof(E)) : 0;
    const size_t b_rf = raw ? align(slots * kRowFactorRows * kChunk * sizeof(float)) : 0;
    const size_t b_p = align(slots * kChunk * kChunk * sizeof(E));
    const size_t b_g = align(slots * p.K * sizeof(float));
    // the backward's per-chunk tensor-core kernel (bf16, delta rule) reuses prepare's inverse, and with
    // vector decay its decayed key products D
    const bool keep_t = states && p.delta() && std::is_same_v<In, __nv_bfloat16>;
    const bool keep_d = keep_t && p.cfg.decay == Decay::Vector;
    const size_t b_t = keep_t ? align(slots * kChunk * kChunk * sizeof(float)) : 0;
    const size_t b_d = keep_d ? b_t : 0;
    // the state between pieces, fp32 [N, HV, K, V], two buffers taken in turn (a scan never writes the
    // buffer it reads its initial state from)
    const size_t state_bytes = size_t(p.HV) * p.K * p.V * sizeof(float);  // one sequence's state
    const size_t b_s = pieces > 1 && !parallel ? align(size_t(p.N()) * state_bytes) : 0;
    // parallel pieces: Γ and L of every (run, value head), the start state of every (piece, sequence)
    const size_t b_run_l = parallel ? align(runs.size() * state_bytes) : 0;
    const size_t b_run_g = parallel ? align(runs.size() * p.HV * p.K * sizeof(float)) : 0;
    const size_t b_starts = parallel ? align(seqs.size() * state_bytes) : 0;
    const size_t b_ready = concurrent ? align(slots * sizeof(int)) : 0;
    const size_t total = b_tables + 2 * b_qk + b_w + b_u + b_tw + b_p + b_g + b_t + b_d + b_rf + 2 * b_s + b_run_l +
                         b_run_g + b_starts + b_ready;
    ScopedWorkspace workspace(workspace_alloc(total, p.op));  // freed on every exit but `keep`'s
    char* ws = workspace.get();
    {
        std::vector<char> image(b_tables);
        auto put = [&](size_t at, const auto& v) {
            if (!v.empty()) std::memcpy(image.data() + at, v.data(), v.size() * sizeof(v[0]));
        };
        put(0, chunks);
        put(o_seqs, seqs);
        put(o_runs, runs);
        put(o_run_first, piece_run_first);
        put(o_order, prep_order);
        check_cuda(cudaMemcpyAsync(ws, image.data(), b_tables, cudaMemcpyHostToDevice, launch_stream()), p.op,
                   "cudaMemcpyAsync(tables)");
    }
    fp.chunks = reinterpret_cast<const ChunkInfo*>(ws);
    fp.seqs = reinterpret_cast<const SeqInfo*>(ws + o_seqs);
    char* at = ws + b_tables;
    fp.Qg = b_qk ? at : nullptr;
    at += b_qk;
    fp.Kd = b_qk ? at : nullptr;
    at += b_qk;
    // the single-shot KDA forward forms W in the scan from prepare's K⊙γ (FwdParams::Kg), of W's size
    const bool kg_for_w = form && !raw && p.cfg.decay == Decay::Vector;
    fp.W = b_w && !kg_for_w ? at : nullptr;
    fp.Kg = kg_for_w ? at : nullptr;
    at += b_w;
    fp.U = b_u ? at : nullptr;
    at += b_u;
    fp.Tw = b_tw ? at : nullptr;
    at += b_tw;
    fp.P = at;
    at += b_p;
    fp.gC = reinterpret_cast<float*>(at);
    at += b_g;
    fp.Tinv = keep_t ? reinterpret_cast<float*>(at) : nullptr;
    at += b_t;
    fp.Dm = keep_d ? reinterpret_cast<float*>(at) : nullptr;
    at += b_d;
    fp.qk_rowf = raw ? reinterpret_cast<float*>(at) : nullptr;
    at += b_rf;
    float* piece_state[2] = {b_s ? reinterpret_cast<float*>(at) : nullptr,
                             b_s ? reinterpret_cast<float*>(at + b_s) : nullptr};
    at += 2 * b_s;
    PieceParams pp{};
    if (parallel) {
        pp.runs = reinterpret_cast<const SeqInfo*>(ws + o_runs);
        pp.piece_run_first = reinterpret_cast<const int*>(ws + o_run_first);
        pp.run_L = reinterpret_cast<float*>(at);
        at += b_run_l;
        pp.run_gamma = reinterpret_cast<float*>(at);
        at += b_run_g;
        pp.piece_start = reinterpret_cast<float*>(at);
        pp.n_seqs = int(p.N());
        pp.pieces = pieces;
    }
    if (concurrent) {
        fp.ready = reinterpret_cast<int*>(at);
        at += b_ready;
    }
    if (!prep_order.empty()) fp.prep_order = reinterpret_cast<const int*>(ws + o_order);

    // load_only: the concurrent forward's kernel loading (launch_prepare_cell)
    auto prepare = [&](const FwdParams& f, int n, bool load_only = false) {
        if (n == 0 && !load_only) return;
        if (p.K == 64) launch_prepare_cell<In, E, 64>(p, f, n, load_only);
        else launch_prepare_cell<In, E, 128>(p, f, n, load_only);
    };
    // the warp-specialised scan's tensor maps (bf16 operands), over the whole workspace: every scan
    // launch below reads its chunks' slots through them
    ScanMaps maps{};
    if constexpr (sizeof(E) == 2) maps = make_scan_maps(a, fp, p.delta(), vt, slots, p.op);
    // strides of a [sequences, HV, K, V] fp32 state in the workspace (a piece's start or end state)
    const int64_t state_strides[4] = {p.HV * p.K * p.V, p.K * p.V, p.V, 1};
    // after_kernel: the scan follows the kernel that wrote its operands on `stream` (programmatic
    // dependent launch, launch_scan_grid)
    auto scan = [&](const FwdParams& f, int n_seqs, cudaStream_t stream, bool after_kernel, bool load_only = false) {
        if (p.K == 64) launch_scan_cell<E, 64>(p, f, maps, n_seqs, vt, stream, after_kernel, load_only);
        else launch_scan_cell<E, 128>(p, f, maps, n_seqs, vt, stream, after_kernel, load_only);
    };
    if (concurrent) {
        PieceStreams& ps = piece_streams(p.op);
        std::lock_guard<std::mutex> lock(ps.mu);
        const cudaStream_t caller = launch_stream();
        check_cuda(cudaMemsetAsync(fp.ready, 0, slots * sizeof(int), caller), p.op, "cudaMemsetAsync(ready flags)");
        check_cuda(cudaEventRecord(ps.ready, caller), p.op, "cudaEventRecord(tables ready)");
        check_cuda(cudaStreamWaitEvent(ps.scan, ps.ready, 0), p.op, "cudaStreamWaitEvent(tables ready)");
        // Both kernels loaded first: with lazy module loading (CUDA's default) a kernel is loaded at its
        // first launch, and loading prepare while the scan already waits for it deadlocked (H100, the
        // scan's 10 s limit hit on the first concurrent call). Then the scan (its stream has the
        // greater priority: its blocks take their SMs before prepare's fill the rest). Joined below
        // however this block is left (see JoinScans).
        prepare(fp, 0, true);
        scan(fp, 0, ps.scan, false, true);
        JoinScans join{ps, caller};
        scan(fp, int(p.N()), ps.scan, false);
        try {
            prepare(fp, int(n_chunks));
        } catch (...) {
            // the scan already waits: raise every flag (bytes 0x01) so that it ends, on garbage that the
            // failed call's caller never sees, instead of stopping the context 10 s later
            cudaMemsetAsync(fp.ready, 1, slots * sizeof(int), caller);
            throw;
        }
        join.join(p.op);
    } else if (pieces == 1) {
        prepare(fp, int(n_chunks));
        scan(fp, int(p.N()), launch_stream(), n_chunks > 0);
    } else if (parallel) {
        // One stream: the scan of piece 0, which needs no start state, measured no faster beside the
        // state pass on the second stream (both are bound by memory traffic): simple GLA B=1 T=16384
        // 0.317 ms in one scan, 0.323 / 0.329 / 0.333 / 0.352 ms with piece 0 on the second stream and
        // 0 / 12 / 24 / 36 chunks longer than the others.
        prepare(fp, int(n_chunks));
        if constexpr (sizeof(E) == 2) {
            const int n_runs = int(runs.size());
            if (p.K == 64 && p.V == 64) launch_piece_starts<64, 64>(fp, pp, n_runs, p.op);
            else if (p.K == 64) launch_piece_starts<64, 128>(fp, pp, n_runs, p.op);
            else if (p.V == 64) launch_piece_starts<128, 64>(fp, pp, n_runs, p.op);
            else launch_piece_starts<128, 128>(fp, pp, n_runs, p.op);
        }
        // every piece at once, each from its start state; the last piece's blocks write the final state
        FwdParams sf = fp;
        sf.h0 = pp.piece_start;
        std::copy(state_strides, state_strides + 4, sf.h0s);
        sf.ht_seq0 = (pieces - 1) * int(p.N());
        scan(sf, int(seqs.size()), launch_stream(), true);
    } else {
        PieceStreams& ps = piece_streams(p.op);
        std::lock_guard<std::mutex> lock(ps.mu);
        const cudaStream_t caller = launch_stream();
        JoinScans join{ps, caller};
        // prepare of piece i: its chunks are blocks [0, n) of a launch whose tables and per-slot operands
        // start at the piece's first chunk
        auto prepare_piece = [&](int i) {
            const size_t c0 = size_t(piece_first[i]), s0 = c0 * p.HV;
            FwdParams pf = fp;
            pf.chunks = fp.chunks + c0;
            auto shift = [&](auto* ptr, size_t per_slot) { return ptr ? ptr + s0 * per_slot : ptr; };
            pf.Qg = shift(static_cast<E*>(fp.Qg), size_t(kChunk) * p.K);
            pf.Kd = shift(static_cast<E*>(fp.Kd), size_t(kChunk) * p.K);
            pf.W = shift(static_cast<E*>(fp.W), size_t(kChunk) * p.K);
            pf.Kg = shift(static_cast<E*>(fp.Kg), size_t(kChunk) * p.K);
            pf.U = shift(static_cast<E*>(fp.U), size_t(kChunk) * p.V);
            pf.Tw = shift(static_cast<E*>(fp.Tw), size_t(kChunk) * kChunk);
            pf.P = shift(static_cast<E*>(fp.P), size_t(kChunk) * kChunk);
            pf.gC = shift(fp.gC, size_t(p.K));
            pf.qk_rowf = shift(fp.qk_rowf, size_t(kRowFactorRows * kChunk));
            prepare(pf, piece_first[i + 1] - piece_first[i]);
            check_cuda(cudaEventRecord(ps.ready, caller), p.op, "cudaEventRecord(piece ready)");
        };
        // Piece i + 1's prepare waits for piece i − 1's scan as well as for piece i's prepare, so that it
        // and piece i's scan become ready together (the scan on the higher-priority stream). Let run
        // ahead, the later prepares' blocks (3 an SM) refill every slot as it frees and a scan block (a
        // whole SM) may find no empty SM until they are all dispatched. Neither order reaches the
        // ~prepare / P + scan of the idea: KDA B=1 T=16384, 2 / 4 / 8 pieces, run ahead 0.765 / 0.802 /
        // 0.866 ms, this order 0.771 / 0.816 / 0.954 (single-shot 0.835); with the 2 pieces taken by
        // default the two orders are the same graph.
        prepare_piece(0);
        for (int i = 0; i < pieces; ++i) {
            check_cuda(cudaStreamWaitEvent(ps.scan, ps.ready, 0), p.op, "cudaStreamWaitEvent(piece ready)");
            check_cuda(cudaEventRecord(ps.scanned, ps.scan), p.op, "cudaEventRecord(piece scanned)");
            // scan of piece i: from the caller's initial state (or zero) or the previous piece's state,
            // to a piece state or, last, the caller's final state
            FwdParams sf = fp;
            sf.seqs = fp.seqs + size_t(i) * p.N();
            if (i > 0) {
                sf.h0 = piece_state[(i - 1) % 2];
                std::copy(state_strides, state_strides + 4, sf.h0s);
            }
            if (i + 1 < pieces) {
                sf.ht = piece_state[i % 2];
                std::copy(state_strides, state_strides + 4, sf.hts);
            }
            scan(sf, int(p.N()), ps.scan, false);
            if (i + 1 < pieces) {
                check_cuda(cudaStreamWaitEvent(caller, ps.scanned, 0), p.op, "cudaStreamWaitEvent(piece scanned)");
                prepare_piece(i + 1);
            }
        }
        // join: the caller's stream (and the workspace's release on it) waits for the last scan
        join.join(p.op);
    }
    if (keep) {
        *keep = fp;
        return workspace.release();
    }
    return nullptr;
}

template <class In>
void forward_chunked(const Problem& p) {
    forward_chunked_impl<In>(p, nullptr, nullptr);
}

template <class In>
void* forward_recompute(const Problem& p, void* states, FwdParams* keep) {
    return forward_chunked_impl<In>(p, states, keep);
}

}  // namespace hla::linear::cuda
