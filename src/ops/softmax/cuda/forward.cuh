// hla — the softmax family's CUDA forward: FlashAttention-2 tiling on tensor cores (mma.sync).
//
// A block owns BM query rows of one (sequence, query head); each warp owns 16 of them. K/V blocks of
// BN keys stream through shared memory in two cp.async stages, walked from the diagonal downwards so
// the masked blocks come first and the forget-gate sums can be carried as a running suffix sum.
// Scores are kept in base 2 (scale · log2 e folded into one multiply) and P never leaves registers:
// the score accumulators are re-packed in place as the A operand of P·V (see common.cuh).
#pragma once

#include "ops/softmax/cuda/common.cuh"

namespace hla::softmax::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D_>
struct FwdTraits {
    static constexpr int D = D_;
    // A warp owns MT m-tiles of 16 rows, so each K/V fragment read from shared memory feeds MT
    // tensor-core ops (ldmatrix bandwidth, not the tensor cores, limits one-tile warps). At D = 256
    // the 16 × 256 fp32 output accumulator alone is 128 registers a thread, so one tile and 32-key
    // blocks keep a thread under 255 registers.
    static constexpr int MT = D <= 128 ? 2 : 1;
    static constexpr int NWARPS = 4;
    static constexpr int THREADS = 32 * NWARPS;
    static constexpr int BM = 16 * MT * NWARPS;
    // FlashAttention-2's 128 × 64 block at D ≤ 128 (a few spilled registers at D = 128, like its 255).
    static constexpr int BN = D <= 128 ? 64 : 32;
    static constexpr int NB = BN / 8;  // 16×8 score blocks per m-tile
    static constexpr int DB = D / 8;   // 16×8 output blocks per m-tile
    // Q tile + two stages of K and V (b16), then the forget-gate sums (fp32).
    static constexpr int SMEM = (BM * D + 4 * BN * D) * 2 + (BN + BM) * 4;
    static_assert(D % 64 == 0, "the swizzle needs rows of at least 8 chunks");
    // K/V tile copies: thread tid moves 16-byte chunk tid % (D/8) of rows tid / (D/8) + k · RSTEP.
    static constexpr int RSTEP = THREADS / (D / 8);
    static_assert(THREADS % (D / 8) == 0 && BN % RSTEP == 0, "whole rows per copy round");
    // Epilogue staging: the BM × D output in fp32, rows padded by 8 floats, over the Q/K/V tiles.
    static constexpr int OUT_STRIDE = D + 8;
    static_assert(BM * OUT_STRIDE * 4 <= (BM * D + 4 * BN * D) * 2, "output staging must fit in the tiles");
};

// FAST: plain attention (no forget gate) with a positive scale, the common case. Its row maxima are
// taken on the raw scores and the scale folds into the exponent's FFMA (one instruction per score
// instead of a multiply and a subtract), and it carries none of the forget-gate registers. The other
// instantiation applies the scale and the bias first and tests for the gate at run time.
template <int D, class T, bool FAST>
__global__ void __launch_bounds__(FwdTraits<D>::THREADS) softmax_fwd_kernel(const FwdParams p) {
    using Tr = FwdTraits<D>;
    constexpr int BM = Tr::BM, BN = Tr::BN, NB = Tr::NB, DB = Tr::DB, THREADS = Tr::THREADS, MT = Tr::MT;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);
    T* sK = sQ + BM * D;       // [2][BN][D]
    T* sV = sK + 2 * BN * D;   // [2][BN][D]
    float* sGk = reinterpret_cast<float*>(sV + 2 * BN * D);  // [BN] key-side gate sums
    float* sRq = sGk + BN;                                    // [BM] query-side gate sums

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Heaviest (latest) query blocks first: under causal masking they see the most keys.
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, seq = blockIdx.z;
    int64_t start = 0;
    int len = p.T, batch = seq;
    if (p.cu_seqlens) {
        start = read_index(p.cu_seqlens, p.cu64, seq);
        len = int(read_index(p.cu_seqlens, p.cu64, seq + 1) - start);
        batch = 0;
    }
    const int q0 = m_block * BM;
    if (q0 >= len) return;
    const int kvh = h / p.G;
    const int mrows = min(BM, len - q0);
    const int q_last = q0 + mrows - 1;
    const int kv_hi = p.causal ? min(len, q_last + 1) : len;
    const int kv_lo = p.window > 0 ? max(0, q0 - p.window + 1) : 0;
    const int n_hi = (kv_hi + BN - 1) / BN, n_lo = kv_lo / BN;
    const bool has_g = !FAST && p.g != nullptr;

    const T* qb = static_cast<const T*>(p.q) + batch * p.q_s[0] + (start + q0) * p.q_s[1] + h * p.q_s[2];
    const T* kb = static_cast<const T*>(p.k) + batch * p.k_s[0] + start * p.k_s[1] + kvh * p.k_s[2];
    const T* vb = static_cast<const T*>(p.v) + batch * p.v_s[0] + start * p.v_s[1] + kvh * p.v_s[2];
    auto g_at = [&](int t) {  // log forget gate of token t of this sequence and head
        return load_any(p.g, batch * p.g_s[0] + (start + t) * p.g_s[1] + h * p.g_s[2], p.g_dtype);
    };

    // This thread's share of every K/V tile copy is the same 16-byte chunk of the same rows of each
    // key block: the offsets are computed once, and a block only moves the base pointers (the
    // generic row loop cost about a fifth of the loop's issue slots in address arithmetic). Only the
    // first (top) block can be partial; the prefetches in the loop copy whole blocks unpredicated.
    const int cp_row = threadIdx.x / (D / 8), cp_chunk = threadIdx.x % (D / 8);
    const T* k_thr = kb + cp_row * p.k_s[1] + cp_chunk * 8;
    const T* v_thr = vb + cp_row * p.v_s[1] + cp_chunk * 8;
    // Destination of copy round i: a fixed offset plus i rounds of rows when a round is a whole
    // number of swizzle periods (8 rows), else the swizzle of each row.
    auto kv_dst = [&](int i) {
        if constexpr (Tr::RSTEP % 8 == 0)
            return swz<D>(cp_row, cp_chunk) + i * Tr::RSTEP * D;
        else
            return swz<D>(cp_row + i * Tr::RSTEP, cp_chunk);
    };
    auto load_kv = [&](int st, int j0, int valid) {
        T* dk = sK + st * BN * D;
        T* dv = sV + st * BN * D;
#pragma unroll
        for (int i = 0; i < BN / Tr::RSTEP; ++i) {
            const int r = cp_row + i * Tr::RSTEP;
            const bool ok = r < valid;
            cp_async16(dk + kv_dst(i), ok ? k_thr + int64_t(j0 + i * Tr::RSTEP) * p.k_s[1] : kb, ok);
            cp_async16(dv + kv_dst(i), ok ? v_thr + int64_t(j0 + i * Tr::RSTEP) * p.v_s[1] : vb, ok);
        }
    };
    auto load_kv_full = [&](int st, int j0) {
        T* dk = sK + st * BN * D;
        T* dv = sV + st * BN * D;
        const T* ks = k_thr + int64_t(j0) * p.k_s[1];
        const T* vs = v_thr + int64_t(j0) * p.v_s[1];
#pragma unroll
        for (int i = 0; i < BN / Tr::RSTEP; ++i) {
            cp_async16(dk + kv_dst(i), ks + int64_t(i * Tr::RSTEP) * p.k_s[1], true);
            cp_async16(dv + kv_dst(i), vs + int64_t(i * Tr::RSTEP) * p.v_s[1], true);
        }
    };

    load_tile_async<BM, D, THREADS>(sQ, qb, p.q_s[1], mrows);
    if (n_hi > n_lo) {
        const int j0 = (n_hi - 1) * BN;
        load_kv(0, j0, kv_hi - j0);
    }
    cp_async_commit();
    // Query-side sums R_i = Σ_{s=i+1..q_last} g_s (anchor q_last keeps them short and accurate).
    float carry = 0;  // warp 0: Σ_{s=j0+BN..q_last} g_s for the current key block j0
    if (has_g && warp == 0) {
        float v[BM / 32];
#pragma unroll
        for (int e = 0; e < BM / 32; ++e) {
            const int r = lane * (BM / 32) + e;
            v[e] = r < mrows ? g_at(q0 + r) : 0.f;
        }
        warp_scan<BM / 32>(v, 0.f, sRq, /*suffix=*/true, /*exclusive=*/true);
    }

    float acc[MT][DB][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < DB; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    // Row maxima in the base-2 exponent domain (scores · scale · log2 e), row sums of 2^(x − max).
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.f;
    const int warp_row = warp * 16 * MT;  // local rows of m-tile mt: warp_row + 16 mt + lane / 4 (+ 8)
    const int c_lo = 2 * (lane % 4);
    // Per-lane ldmatrix offsets (bytes, within a tile). The swizzle XORs the chunk with row % 8 and
    // every fragment row offset is a multiple of 8, so the fragment at (row r0 + 16·i, chunk c0 + 2·k)
    // sits at base(r0, c0) XOR 32·k + 16·i rows: one base a lane and compile-time offsets instead of
    // the swizzle recomputed for every load (it was rematerialised at the top of every iteration).
    auto swz_bytes = [](int row, int chunk) { return uint32_t(row * D + ((chunk ^ (row & 7)) << 3)) * 2; };
    const uint32_t q_a = swz_bytes(warp_row + (lane % 16), lane / 16);
    const uint32_t k_b = swz_bytes((lane % 8) + (lane / 16) * 8, (lane / 8) % 2);
    const uint32_t v_t = swz_bytes((lane % 8) + ((lane / 8) % 2) * 8, lane / 16);
    const uint32_t sQ0 = smem_addr(sQ);

    int stage = 0;
    for (int n = n_hi - 1; n >= n_lo; --n, stage ^= 1) {
        const int j0 = n * BN;
        cp_async_wait<0>();
        __syncthreads();
        if (n - 1 >= n_lo) load_kv_full(stage ^ 1, (n - 1) * BN);  // prefetch the next (lower) block
        cp_async_commit();
        if (has_g) {
            if (warp == 0) {
                // sGk[c] = Σ_{s=j0+c+1..q_last} g_s, gates past q_last counting as 0.
                float v[BN / 32];
#pragma unroll
                for (int e = 0; e < BN / 32; ++e) {
                    const int j = j0 + lane * (BN / 32) + e;
                    v[e] = j <= q_last ? g_at(j) : 0.f;
                }
                carry += warp_scan<BN / 32>(v, carry, sGk, /*suffix=*/true, /*exclusive=*/true);
            }
            __syncthreads();
        }
        const uint32_t cK = smem_addr(sK + stage * BN * D);
        const uint32_t cV = smem_addr(sV + stage * BN * D);

        // S = Q Kᵀ for this warp's MT × 16 rows; each K fragment serves all MT m-tiles.
        float s[MT][NB][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < NB; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sQ0 + ((q_a ^ (kk << 5)) + mt * 16 * D * 2));
#pragma unroll
            for (int nn = 0; nn < BN / 16; ++nn) {
                uint32_t b[4];
                ldmatrix_x4(b, cK + ((k_b ^ (kk << 5)) + nn * 16 * D * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(s[mt][2 * nn], a[mt], b[0], b[1]);
                    mma16816<T>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // Generic path: scale and bias now (the max is taken in the exponent domain).
        if constexpr (!FAST) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][nb][e] * p.scale_log2;
                        if (has_g) {
                            const int rl = warp_row + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
                            x += (sGk[nb * 8 + c_lo + (e & 1)] - sRq[rl]) * kLog2e;
                        }
                        s[mt][nb][e] = x;
                    }
        }
        // Mask: one uniform branch around the whole tile (a test per score compiled to a branch per
        // score, a fifth of the loop's stall samples); only blocks that touch a boundary take it.
        const bool need_mask = (p.causal && j0 + BN - 1 > q0) || (p.window > 0 && j0 <= q_last - p.window) ||
                               (j0 + BN > len);
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = q0 + warp_row + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
                        const int j = j0 + nb * 8 + c_lo + (e & 1);
                        const bool visible = j < len && (!p.causal || j <= i) && (p.window <= 0 || j > i - p.window);
                        s[mt][nb][e] = visible ? s[mt][nb][e] : -INFINITY;
                    }
        }

        // Online softmax: per m-tile, rows lane/4 (e = 0, 1) and lane/4 + 8 (e = 2, 3); a row lives in
        // one lane quad.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                // Maxima and sums in independent partial chains (a single running one is a chain of
                // NB dependent operations at two warps a scheduler, which cannot hide its latency).
                float mxp[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
                    mxp[nb & 1] = fmaxf(mxp[nb & 1], fmaxf(s[mt][nb][2 * hf], s[mt][nb][2 * hf + 1]));
                float mx = fmaxf(mxp[0], mxp[1]);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                if constexpr (FAST) mx *= p.scale_log2;  // scale > 0 keeps the arg max; −inf stays −inf
                mx = fmaxf(mx, row_max[mt][hf]);
                // A row with nothing visible yet keeps max −inf; subtracting 0 instead avoids −inf − (−inf).
                const float m_use = mx == -INFINITY ? 0.f : mx;
                const float alpha = fast_exp2(row_max[mt][hf] - m_use);
                row_max[mt][hf] = mx;
                float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
                        const float x = FAST ? fmaf(s[mt][nb][e], p.scale_log2, -m_use) : s[mt][nb][e] - m_use;
                        s[mt][nb][e] = fast_exp2(x);
                        sum[(nb & 1) * 2 + (e & 1)] += s[mt][nb][e];
                    }
                row_sum[mt][hf] = row_sum[mt][hf] * alpha + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
#pragma unroll
                for (int db = 0; db < DB; ++db) {
                    acc[mt][db][2 * hf] *= alpha;
                    acc[mt][db][2 * hf + 1] *= alpha;
                }
            }

        // O += P V; each V fragment serves all MT m-tiles.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Pack2<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = Pack2<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = Pack2<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = Pack2<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, cV + ((v_t ^ (dn << 5)) + kk * 16 * D * 2));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(acc[mt][2 * dn], a[mt], b[0], b[1]);
                    mma16816<T>(acc[mt][2 * dn + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the Q/K/V tiles: they become the output staging area

    // Epilogue, in two steps so that the store code is one short loop rather than an unrolled
    // branchy store per accumulator (which was a sixth of the stall samples, mostly instruction
    // fetch): normalised rows go to shared memory (fp32, rows padded by 8 floats so that the 8 rows
    // of a fragment store hit distinct banks), then each thread writes 8 channels of a row at a time.
    constexpr int OS = Tr::OUT_STRIDE;
    float* sO = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float l = row_sum[mt][hf];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int r = warp_row + mt * 16 + lane / 4 + 8 * hf;
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int db = 0; db < DB; ++db)
                *reinterpret_cast<float2*>(sO + r * OS + db * 8 + c_lo) =
                    make_float2(acc[mt][db][2 * hf] * inv, acc[mt][db][2 * hf + 1] * inv);
            if (p.lse && lane % 4 == 0 && r < mrows)
                p.lse[batch * p.lse_s[0] + h * p.lse_s[1] + (start + q0 + r) * p.lse_s[2]] =
                    l > 0.f ? row_max[mt][hf] * kLn2 + logf(l) : -INFINITY;
        }
    __syncthreads();
    const int o_native = std::is_same<T, __half>::value ? 1 : 0;
    for (int e = threadIdx.x; e < mrows * (D / 8); e += THREADS) {
        const int r = e / (D / 8), c = (e % (D / 8)) * 8;
        const float4 lo = *reinterpret_cast<const float4*>(sO + r * OS + c);
        const float4 hi = *reinterpret_cast<const float4*>(sO + r * OS + c + 4);
        float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const int64_t tok = start + q0 + r;
        if (p.gate) {
            const int64_t zb = batch * p.gate_s[0] + tok * p.gate_s[1] + h * p.gate_s[2] + c;
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] *= 1.f / (1.f + __expf(-load_any(p.gate, zb + i, p.gate_dtype)));
        }
        const int64_t ob = batch * p.o_s[0] + tok * p.o_s[1] + h * p.o_s[2] + c;
        T* o16 = static_cast<T*>(p.o) + ob;
        if (p.o_dtype == o_native && reinterpret_cast<uintptr_t>(o16) % 16 == 0) {
            *reinterpret_cast<uint4*>(o16) = make_uint4(Pack2<T>::pack(v[0], v[1]), Pack2<T>::pack(v[2], v[3]),
                                                        Pack2<T>::pack(v[4], v[5]), Pack2<T>::pack(v[6], v[7]));
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) store_any(p.o, ob + i, p.o_dtype, v[i]);
        }
    }
}

}  // namespace hla::softmax::cuda
