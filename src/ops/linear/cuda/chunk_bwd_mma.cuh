// hla — stage 3 of the chunked backward (chunk_bwd.cuh) on 16-bit tensor cores: bf16 inputs, decay
// that is one number per token (none, fixed, per-token scalar), additive or delta update.
//
// One block (16 warps) per (chunk, query/key head); it walks the G value heads of its group with dq and
// dk accumulating in registers. Everything of a chunk stays in shared memory (≤ 216 KiB, one block per
// SM); the products are mma.sync m16n8k16 (warp_gemm, common.cuh) with fp32 accumulation, except
// Z = Tᵀ dX (tf32, from fp32 T and dX). T comes from stage 1 (chunk_prepare_mma keeps its inverse). Warp w owns rows [16·(w % 4), +16) of every 64-row result and
// a quarter of its columns (w / 4), so the per-row factors below multiply fragments directly.
//
// The math is the fp32 kernel's (chunk_bwd.cuh, after cpu_chunk.cpp) with the decay a scalar per token:
// Γ_ij = e^{b_i − b_j} (j ≤ i), γ_i = e^{b_i}, κ_i = e^{b_C − b_i}, q̂, k̂ the scaled / normalised rows.
//   P = (q̂ k̂ᵀ) ⊙ Γ (j ≤ i);   D = (k̂ k̂ᵀ) ⊙ Γ (j < i);   A = diag(β) D;   T = (I + A)^{-1}
//   X = U − W S0 (delta; the forward scan's Ũ, from prepare's U, W) or V (additive)
//   dX = Pᵀ dO + diag(κ) k̂ dS_C;   Z = Tᵀ dX;   M = Z S0ᵀ
//   dP = dO Xᵀ;   dA = −Z Xᵀ;   dD = diag(β) dA
//   dq = (dP ⊙ Γ)_{j<i} k̂ + diag(dP) k̂ + diag(γ) dO S0ᵀ
//   dk = (dP ⊙ Γ)ᵀ_{j<i} q̂ + diag(dP) q̂ + (E + Eᵀ) k̂ − diag(γ β) M + diag(κ) X dS_Cᵀ,   E = dD ⊙ Γ
//   dv = diag(β) Z (delta) or dX (additive)
//   dβ_i = ⟨Z_i, v_i⟩ − γ_i ⟨M_i, k̂_i⟩ + Σ_{j<i} dA_ij D_ij
//   dg_t = c + Σ_{i≥t} Σ_{j<t} F_ij + Σ_{i≥t} u_i + Σ_{j<t} w_j   (the exact scalar-decay dg)
//     F_ij = dP_ij P_ij + dD_ij D_ij,  u_i = γ_i (⟨q̂_i, (dO S0ᵀ)_i⟩ − β_i ⟨k̂_i, M_i⟩),
//     w_j = κ_j ⟨k̂_j, (X dS_Cᵀ)_j⟩,  c = γ_C Σ S0 ⊙ dS_C.
// Every exponent is a difference of fp64 in-chunk sums of one sign (≤ 0), so g = −1000 stays exact.
//
// With vector decay (kVec) the same kernel is the first of two (chunk_bwd_vec_mma.cuh): it keeps the
// products above whose dot carries no decay and hands dP, dD and the raw K-wide products to the second.
#pragma once

#include <algorithm>

#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/chunk_bwd.cuh"
#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {

namespace bwd {

// Threads of a block of the tensor-core kernel here and of the vector-decay kernel
// (chunk_bwd_vec_mma.cuh). Warp w owns rows [16·(w % 4), +16) of every 64-row result and the (w / 4)-th
// of col_groups(threads) column slices. With one block per SM (the chunk's operands fill shared memory)
// the kernels are latency bound: 8 warps left 80% of issue cycles without an eligible warp (ncu,
// session 5). 16 warps cap registers at 128 (a few spill slots) and were faster on the H100 (B=4 T=4096
// H=16 K=V=128 fwd+bwd: GDN 3.67 -> 2.66 ms, KDA 5.92 -> 4.67 ms).
constexpr int kMmaThreads = 512;
constexpr int kVecThreads = 512;
constexpr int col_groups(int threads) { return threads / 128; }

// Shared memory of store_dq_dk (below): dq's and dk's fragments as fp32 rows.
constexpr size_t dq_dk_stage_bytes(int K) { return 2 * size_t(kChunk) * size_t(K + 4) * 4; }

// The padding of every shared-memory row of chunk_bwd_mma_kernel's operand tiles, which keeps ldmatrix
// free of bank conflicts, and of the copy engine's boxes that land them (Stage3Maps): 16 bytes.
constexpr int kBoxPadBytes = 16;

// The mbarriers of chunk_bwd_mma_kernel's copy-engine loads, each completing once a value head (q and
// k once a block).
enum LoadBarrier { kBarQK, kBarOperands, kBarT, kLoadBarriers };

template <Update Up, int K, int V>
struct MmaLayout {
    static constexpr bool kDelta = Up == Update::Delta;
    // rows padded by kBoxPadBytes: 16-byte aligned, ldmatrix conflict-free, and the copy engine's padded
    // boxes land them as they are
    static constexpr int LDK = K + kBoxPadBytes / 2, LDV = V + kBoxPadBytes / 2;  // bf16 rows
    static constexpr int LDC = kChunk + kBoxPadBytes / 2;                         // bf16 64-column rows
    static constexpr int LDF = kChunk + kBoxPadBytes / 4;                         // fp32 64-column rows
    static constexpr int LDVF = V + 4;              // fp32 V-column rows
    static constexpr size_t q_off = 0;                                 // q̂ [64][LDK]
    static constexpr size_t k_off = q_off + size_t(kChunk) * LDK * 2;  // k̂ [64][LDK]
    static constexpr size_t do_off = k_off + size_t(kChunk) * LDK * 2; // dO [64][LDV]
    static constexpr size_t s0_off = do_off + size_t(kChunk) * LDV * 2;  // S0 [K][LDV]
    static constexpr size_t ds_off = s0_off + size_t(K) * LDV * 2;       // dS_C [K][LDV]
    // delta: U [64][LDV] and W [64][LDK], then T fp32 [64][LDF]; additive: V [64][LDV] (= X)
    static constexpr size_t uw_off = ds_off + size_t(K) * LDV * 2;
    static constexpr size_t uw_bytes =
        kDelta ? std::max(size_t(kChunk) * (LDV + LDK) * 2, size_t(kChunk) * LDF * 4) : size_t(kChunk) * LDV * 2;
    static constexpr size_t x_off = uw_off + uw_bytes;  // delta: X [64][LDV]
    static constexpr size_t dx_off = x_off + (kDelta ? size_t(kChunk) * LDV * 2 : 0);  // delta: dX fp32 [64][LDVF], then Z bf16 [64][LDV]
    static constexpr size_t pb_off = dx_off + (kDelta ? size_t(kChunk) * LDVF * 4 : 0);  // P bf16 [64][LDC]
    // (at least store_dq_dk's stage from do_off: the additive update's operands can be smaller)
    static constexpr size_t r_off = std::max(pb_off + size_t(kChunk) * LDC * 2, do_off + dq_dk_stage_bytes(K));
    // per row: b (fp64); the copy engine's mbarriers (LoadBarrier); fp32 γ, κ, β, raw β, gate input, dP_ii,
    // u, w, dβ, then q's and k's 1 / ‖x‖; misc
    static constexpr size_t bar_off = r_off + kChunk * 8;
    static constexpr size_t rowf_off = bar_off + kLoadBarriers * 8;
    static constexpr int kRowF = 11;
    static constexpr size_t bytes = rowf_off + kRowF * kChunk * 4 + (1 + 2 * kMmaThreads / 32) * 4;
    // Reused once the chunk's products are done: [s0_off, r_off) holds E1 = dP⊙Γ and E = dD⊙Γ + its
    // transpose (bf16 [64][LDC]) and F (fp32 [64][LDF]); after the group, [do_off, r_off) is store_dq_dk's
    // (q̂, k̂ stay for it).
    static constexpr size_t late_bytes = r_off - s0_off;
    static_assert(2 * size_t(kChunk) * LDC * 2 + size_t(kChunk) * LDF * 4 <= late_bytes, "bwd mma: E1, E, F do not fit");
    static_assert(do_off + dq_dk_stage_bytes(K) <= r_off, "bwd mma: the dq/dk staging does not fit");
    // the copy engine's tiles (Stage3Maps) start at 128-byte boundaries
    static_assert((k_off | do_off | s0_off | ds_off | uw_off | (uw_off + size_t(kChunk) * LDV * 2) | pb_off) % 128 == 0,
                  "bwd mma: a copy-engine tile off its 128-byte alignment");
    static_assert(bytes <= 227 * 1024, "bwd mma: shared memory over the 227 KiB of an SM");
};

// A lane's partial sums of its two fragment rows of an m16 accumulator (s[0]: row lane / 4, s[1]: that
// row + 8), summed over the four lanes that share the rows: every lane of the quad then holds them.
__device__ __forceinline__ void reduce_fragment_row_sums(float (&s)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        s[h] += __shfl_xor_sync(0xffffffffu, s[h], 1);
        s[h] += __shfl_xor_sync(0xffffffffu, s[h], 2);
    }
}

// The same, added into dst[row0 + row] (shared-memory atomics: the col_groups warps of a row band share
// each row).
__device__ __forceinline__ void add_fragment_row_sums(float (&s)[2], float* dst, int row0) {
    reduce_fragment_row_sums(s);
    const int lane = threadIdx.x & 31;
    if ((lane & 3) == 0) {
        atomicAdd(dst + row0 + (lane >> 2), s[0]);
        atomicAdd(dst + row0 + (lane >> 2) + 8, s[1]);
    }
}

// A K-wide product's share of dq or dk: for the warp's tile acc (rows row0 + r; columns c, from the
// tile's first key column of x), dst += a_i · acc_i and rows[r / 8] += b_i · ⟨acc_i, x_i⟩ over the lane's
// column pairs, with (a_i, b_i) = factors(i); x is bf16 with row stride ldx. One 32-bit load of x per
// pair; rows are the lane's partial sums (reduce_fragment_row_sums).
template <int NT, class Factors>
__device__ __forceinline__ void add_scaled_rows(float (&dst)[1][NT][4], float (&acc)[1][NT][4], const __nv_bfloat16* x,
                                                int ldx, int row0, float (&rows)[2], Factors&& factors) {
    for_each_acc_pair(acc, [&](int r, int c, float x0, float x1) {
        const int i = row0 + r;
        const float2 f = factors(i);
        float* d = &dst[0][c >> 3][(r >> 3) * 2];
        d[0] += f.x * x0;
        d[1] += f.x * x1;
        const float2 xv = load_pair(x + i * ldx + c);
        rows[r >> 3] += f.y * (x0 * xv.x + x1 * xv.y);
    });
}

// q̂ and k̂ of a chunk in place from the raw rows in shared memory (bf16, row stride LDK): scaled /
// L2-normalised, THREADS / 64 lanes a row: lane p of a row takes the row's 16-byte pieces p,
// p + THREADS / 64, ... (the lanes of a row read different banks), and the row's sums take
// log2(THREADS / 64) shuffles (one warp a row put a five-step shuffle chain on every row). inv_norm
// [2][64] gets the rows' 1 / ‖x‖ (q's, then k's; 1 without the norm) for store_dq_dk's backward of it.
// Rows ≥ len (past the chunk's sequence, whatever they hold) become zeros.
template <int K, int LDK, int THREADS>
__device__ __forceinline__ void normalize_qk_rows(__nv_bfloat16* Qs, __nv_bfloat16* Ks, float* inv_norm, const Params& p,
                                                  int len) {
    using E = __nv_bfloat16;
    constexpr int LPR = THREADS / kChunk, PR = K / 8;  // lanes a row, 16-byte pieces a row
    static_assert(LPR * kChunk == THREADS && 32 % LPR == 0 && PR % LPR == 0, "normalize_qk_rows: lanes a row");
    const int i = threadIdx.x / LPR, part = threadIdx.x % LPR;
    uint4* qrow = reinterpret_cast<uint4*>(Qs + i * LDK);
    uint4* krow = reinterpret_cast<uint4*>(Ks + i * LDK);
    float sq = 0.f, sk = 0.f, unused = 0.f;
#pragma unroll
    for (int j = part; j < PR; j += LPR) add_piece_squares(qrow[j], krow[j], sq, sk, unused);
    const bool in = i < len;
    const float2 n = qk_inv_norms(lane_group_sum<LPR>(sq), lane_group_sum<LPR>(sk), p.qk_l2norm);
    const float2 f = make_float2(p.scale * n.x, n.y);  // qk_row_factors_of_sums
    if (part == 0) {
        inv_norm[i] = in ? n.x : 0.f;
        inv_norm[kChunk + i] = in ? n.y : 0.f;
    }
#pragma unroll
    for (int j = part; j < PR; j += LPR) {
        const uint4 qa = qrow[j], ka = krow[j];
        const uint32_t qw[4] = {qa.x, qa.y, qa.z, qa.w}, kw[4] = {ka.x, ka.y, ka.z, ka.w};
        float qv[8], kv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            qv[e] = in ? unpack_elem<E>(qw, e) * f.x : 0.f;
            kv[e] = in ? unpack_elem<E>(kw, e) * f.y : 0.f;
        }
        store_vec<E>(reinterpret_cast<E*>(qrow + j), qv);
        store_vec<E>(reinterpret_cast<E*>(krow + j), kv);
    }
}

// The chunk's raw q and k rows (query/key head h) into Qs, Ks (row stride LDK), rows past the chunk's
// end zero, by the block's asynchronous copies (the caller commits and waits).
template <int K, int LDK, int THREADS>
__device__ __forceinline__ void copy_qk_rows(__nv_bfloat16* Qs, __nv_bfloat16* Ks, const Params& p, const ChunkInfo& ci,
                                             int h) {
    using E = __nv_bfloat16;
    stage_rows<K, THREADS>(Qs, LDK, static_cast<const E*>(p.q) + tok(p.qs, ci.batch, ci.start, h), p.qs[1], ci.len);
    stage_rows<K, THREADS>(Ks, LDK, static_cast<const E*>(p.k) + tok(p.ks, ci.batch, ci.start, h), p.ks[1], ci.len);
}

// q̂ and k̂ from the chunk's raw rows, copied in by the block first.
template <int K, int LDK, int THREADS>
__device__ __forceinline__ void stage_qk_hat(__nv_bfloat16* Qs, __nv_bfloat16* Ks, float* inv_norm, const Params& p,
                                             const ChunkInfo& ci, int h) {
    copy_qk_rows<K, LDK, THREADS>(Qs, Ks, p, ci, h);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    normalize_qk_rows<K, LDK, THREADS>(Qs, Ks, inv_norm, p, ci.len);
}

// dq and dk of a chunk (register fragments of warp w: rows 16·(w % 4).., key columns (w / 4)·K/4..,
// summed over the group) through the scale and the in-kernel L2 norm to the outputs. The fragments go
// to `stage` (dq_dk_stage_bytes, apart from Qs and Ks, whose rows are LDK apart) as fp32 rows; the norm's backward takes its
// unit rows x̂ from the chunk's q̂ = scale·x̂ (Qs) and k̂ = x̂ (Ks) and the rows' inv_norm
// (normalize_qk_rows), so no raw row is read again: reading them back from global memory (two passes
// through a stage over Qs and Ks) took ~15000 of the GDN kernel's ~75000 cycles a block (clock64
// trace, H100, B=4 T=4096 H=16, session 11). x̂ carries q̂'s bf16 rounding (2^-9), as do the products
// that made dq and dk. LPR lanes a row (lane q of a row takes its column pairs q, q + LPR, ...), the
// rows THREADS / LPR at a time, log2(LPR) shuffles a sum. LPR = 8 (every row at once) against 32 (one
// warp a row, four rows in turn): chunk_bwd_mma_kernel<GDN> 1160 -> 1110 us, but
// chunk_bwd_vec_kernel<KDA>, at its 128-register cap, 1480 -> 1520, so it keeps 32.
template <int K, int LDK, int THREADS, int LPR, int NTK>
__device__ __forceinline__ void store_dq_dk(float (&dq)[1][NTK][4], float (&dk)[1][NTK][4], float* stage,
                                            const __nv_bfloat16* Qs, const __nv_bfloat16* Ks, const float* inv_norm,
                                            const Params& p, const ChunkInfo& ci, int h) {
    constexpr int LDS = K + 4;        // the stage's fp32 rows
    constexpr int ROWS = 2 * kChunk;  // dq's rows, then dk's
    constexpr int NP = K / 2 / LPR;   // column pairs a lane
    static_assert(THREADS % LPR == 0 && 32 % LPR == 0 && NP * LPR * 2 == K && ROWS % (THREADS / LPR) == 0,
                  "store_dq_dk: lanes a row");
    const int warp = threadIdx.x >> 5;
    const int row0 = 16 * (warp & 3), kc0 = (warp >> 2) * (K / col_groups(THREADS)), len = ci.len;
    for_each_acc(dq, [&](int r, int c, float& x) { stage[(row0 + r) * LDS + kc0 + c] = x; });
    for_each_acc(dk, [&](int r, int c, float& x) { stage[(kChunk + row0 + r) * LDS + kc0 + c] = x; });
    __syncthreads();
    const int q = threadIdx.x % LPR;
    // rows past the chunk's end compute on zero rows and store nothing (the shuffles need every lane)
    for (int ir = threadIdx.x / LPR; ir < ROWS; ir += THREADS / LPR) {
        const bool is_q = ir < kChunk;
        const int i = ir % kChunk;
        const float f = is_q ? p.scale : 1.f;
        float2 d[NP];
#pragma unroll
        for (int g = 0; g < NP; ++g) {
            const float2 s = *reinterpret_cast<const float2*>(stage + ir * LDS + 2 * (q + g * LPR));
            d[g] = make_float2(f * s.x, f * s.y);
        }
        if (p.qk_l2norm) {
            // d ← (f d − x̂ ⟨x̂, f d⟩) / ‖x‖ (l2norm_scale_backward_row's math), x̂ = q̂ / f; f = 0 leaves 0
            const __nv_bfloat16* xs = (is_q ? Qs : Ks) + i * LDK;
            const float unit = f != 0.f ? 1.f / f : 0.f;
            float2 x[NP];
            float dot = 0.f;
#pragma unroll
            for (int g = 0; g < NP; ++g) {
                const float2 r = load_pair(xs + 2 * (q + g * LPR));
                x[g] = make_float2(unit * r.x, unit * r.y);
                dot += x[g].x * d[g].x + x[g].y * d[g].y;
            }
            dot = lane_group_sum<LPR>(dot);
            const float inv = inv_norm[ir];
#pragma unroll
            for (int g = 0; g < NP; ++g) {
                d[g].x = (d[g].x - x[g].x * dot) * inv;
                d[g].y = (d[g].y - x[g].y * dot) * inv;
            }
        }
        void* out = is_q ? p.dq : p.dk;
        if (out && i < len) {
            const DType odt = is_q ? p.dq_dt : p.dk_dt;
            const int64_t ooff = is_q ? tok(p.dqs, ci.batch, ci.start + i, h) : tok(p.dks, ci.batch, ci.start + i, h);
#pragma unroll
            for (int g = 0; g < NP; ++g) store_pair_any(out, odt, ooff + 2 * (q + g * LPR), d[g].x, d[g].y);
        }
    }
}

// Tensor maps (tma.cuh) of the copy engine's loads of chunk_bwd_mma_kernel, each box one operand tile
// in the kernel's padded row layout: a box is kBoxPadBytes wider than its tensor (8 bf16 or 4 fp32
// columns), the columns past the tensor's edge land as zeros, and the rows arrive at the stride ldmatrix
// reads without bank conflicts, one copy a tile. The per-(chunk, value head) workspace blocks are 2-D
// [slots·rows, cols] matrices (S0, dS_C: K rows; U, W, K̄, P, T: 64); the inputs 4-D [B, T, heads, D]
// views read a head's 64 tokens a box, when rows_tma_ready (else the block copies them itself:
// *_tma false). Rows past a chunk's sequence (a box reads on into the next) are zeroed in the kernel.
// Against 16-byte cp.async by every thread (~7000 of them a value head at K = V = 128), the block
// issues nothing: session 11's clock64 trace of this kernel (H100, GDN B=4 T=4096 H=16) had issuing
// those copies hold the block ~11500 of its ~75000 cycles and the q, k copies another ~6000; a bulk
// copy a row (~600 a value head) took three times longer to land.
struct Stage3Maps {
    CUtensorMap q, k, d_o, v, S0, dS, U, W, Kd, P, T;
    bool qk_tma, do_tma, v_tma;
};

// Bytes of a padded box of `rows` rows of `cols` elements of `elem` bytes.
constexpr uint32_t padded_box_bytes(int rows, int cols, int elem) {
    return uint32_t(rows) * uint32_t(cols * elem + kBoxPadBytes);
}

// Rows [from, 64) of a bf16 tile of COLS columns (row stride ld) zeroed by the block (16-byte stores).
template <int COLS, int THREADS>
__device__ __forceinline__ void zero_rows_from(__nv_bfloat16* tile, int ld, int from) {
    constexpr int PR = COLS / 8;
    for (int idx = threadIdx.x; idx < (kChunk - from) * PR; idx += THREADS)
        *reinterpret_cast<uint4*>(tile + (from + idx / PR) * ld + 8 * (idx % PR)) = make_uint4(0, 0, 0, 0);
}

// kVec: the first of the two vector-decay kernels. It computes everything of the chunk whose products
// carry no decay inside a dot product (X, dX with prepare's P and K̄, Z, dv, dP, dD, dβ's Z and D terms,
// dO S0ᵀ, Z S0ᵀ, X dS_Cᵀ) and hands the rest to chunk_bwd_vec_kernel through Params::v_*; q and k are
// not read (P and K̄ come from stage 1).
template <Update Up, bool kVec, int K, int V>
__global__ void __launch_bounds__(kMmaThreads, 1) chunk_bwd_mma_kernel(const Params p, const __grid_constant__ Stage3Maps maps) {
    using E = __nv_bfloat16;
    using L = MmaLayout<Up, K, V>;
    constexpr bool kDelta = L::kDelta;
    constexpr int LDK = L::LDK, LDV = L::LDV, LDC = L::LDC, LDF = L::LDF, LDVF = L::LDVF;
    // n-tiles of a warp's slice of K, V or the chunk's 64 columns
    constexpr int CG = col_groups(kMmaThreads);
    constexpr int NTK = K / (8 * CG), NTV = V / (8 * CG), NTC = kChunk / (8 * CG);
    extern __shared__ __align__(128) float4 bwd_mma_smem[];  // (the copy engine's tiles: 128-byte aligned)
    char* sm = reinterpret_cast<char*>(bwd_mma_smem);
    E* Qs = reinterpret_cast<E*>(sm + L::q_off);
    E* Ks = reinterpret_cast<E*>(sm + L::k_off);
    E* dOs = reinterpret_cast<E*>(sm + L::do_off);
    E* S0s = reinterpret_cast<E*>(sm + L::s0_off);
    E* dSs = reinterpret_cast<E*>(sm + L::ds_off);
    E* Us = reinterpret_cast<E*>(sm + L::uw_off);              // delta: U; additive: V (= X)
    E* Ws = Us + kChunk * LDV;                                 // delta
    float* Tm = reinterpret_cast<float*>(sm + L::uw_off);      // delta, after X: T
    E* Xs = kDelta ? reinterpret_cast<E*>(sm + L::x_off) : Us;
    float* dXf = reinterpret_cast<float*>(sm + L::dx_off);     // delta: dX fp32
    E* Zs = reinterpret_cast<E*>(sm + L::dx_off);              // delta: Z bf16, once dX is consumed
    E* Pb = reinterpret_cast<E*>(sm + L::pb_off);
    E* E1b = reinterpret_cast<E*>(sm + L::s0_off);             // late: dP ⊙ Γ (strict lower)
    E* E2b = E1b + kChunk * LDC;                               // late: dD ⊙ Γ + transpose
    float* Fm = reinterpret_cast<float*>(E2b + kChunk * LDC);  // late: F
    float* stage = reinterpret_cast<float*>(sm + L::do_off);   // after the group: store_dq_dk's
    double* bsm = reinterpret_cast<double*>(sm + L::r_off);
    uint64_t* bars = reinterpret_cast<uint64_t*>(sm + L::bar_off);  // LoadBarrier
    float* rowf = reinterpret_cast<float*>(sm + L::rowf_off);
    float* gam = rowf;                  // e^{b_i}
    float* kap = rowf + kChunk;         // e^{b_C − b_i}
    float* betas = rowf + 2 * kChunk;   // β_i (activation applied)
    float* braw = rowf + 3 * kChunk;    // raw β input
    float* gin = rowf + 4 * kChunk;     // gate input g + dt_bias (in-kernel gate)
    float* dpd = rowf + 5 * kChunk;     // dP_ii
    float* us = rowf + 6 * kChunk;
    float* ws_ = rowf + 7 * kChunk;
    float* dbs = rowf + 8 * kChunk;
    float* inv_norm = rowf + 9 * kChunk;  // [2][64]: q's, k's 1 / ‖x‖ (normalize_qk_rows)
    float* misc = rowf + L::kRowF * kChunk;  // [0]: Σ S0 ⊙ dS_C; [1..]: per-warp sums of the chunk's dg, dA_log

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int mw = warp & 3, nh = warp >> 2, row0 = 16 * mw;
    const int chunk = blockIdx.x, h = blockIdx.y;
    const ChunkInfo ci = p.chunks[chunk];
    const int len = ci.len;
    const bool gated = !kVec && p.gate_act != GateActivation::None && p.decay == Decay::Scalar;

    // ---- copies: the copy engine's (Stage3Maps), issued by one thread; an input the maps cannot read
    // (or dO not in bf16) is copied by the whole block instead (cp.async, or element copies), waited for
    // with the copy engine's ----
    const bool loader = tid == kMmaThreads - 32;  // (warp 0 loads the gate inputs meanwhile)
    if (tid == 0) {
        for (int b = 0; b < kLoadBarriers; ++b) tma::mbar_init(bars + b, 1);
        tma::fence_init();
    }
    __syncthreads();
    if constexpr (!kVec) {
        if (loader) {
            tma::mbar_expect(bars + kBarQK, maps.qk_tma ? 2 * padded_box_bytes(kChunk, K, 2) : 0);
            if (maps.qk_tma) {
                tma::load_4d(Qs, &maps.q, 0, h, ci.start, ci.batch, bars + kBarQK);
                tma::load_4d(Ks, &maps.k, 0, h, ci.start, ci.batch, bars + kBarQK);
            }
        }
        if (!maps.qk_tma) copy_qk_rows<K, LDK, kMmaThreads>(Qs, Ks, p, ci, h);
        cp_async_commit();
    }

    float dq[1][NTK][4], dk[1][NTK][4];  // rows row0.., key columns kc0..
    zero_acc(dq);
    zero_acc(dk);
    const int kc0 = nh * (K / CG), vc0 = nh * (V / CG), jc0 = nh * (kChunk / CG);

    for (int hv = h * p.G; hv < (h + 1) * p.G; ++hv) {
        const size_t slot = size_t(chunk) * p.HV + hv;
        const uint32_t parity = uint32_t(hv - h * p.G) & 1;  // each barrier completes once a value head
        // ---- the gate and β inputs (warp 0: two tokens a lane; warps 1, 2: β), loaded first: the decay
        // sums formed from them are needed before P and D, which overlap the operands' landing (issuing
        // them ahead of the copies instead measured 1% slower, session 11) ----
        float in[2] = {0.f, 0.f};
        if (warp == 0 && !kVec) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = 2 * lane + e;
                if (i >= len) continue;
                if (p.decay == Decay::Scalar) in[e] = load_any(p.g, p.g_dt, tok(p.gs, ci.batch, ci.start + i, hv));
                else if (p.decay == Decay::Fixed) in[e] = load_any(p.g, p.g_dt, hv * p.gs[0]);
            }
        } else if (kDelta && (warp == 1 || warp == 2)) {
            const int i = (warp - 1) * 32 + lane;
            if (i < len) in[0] = load_any(p.beta, p.beta_dt, tok(p.bs, ci.batch, ci.start + i, hv));
        }
        // ---- operands of this value head: delta: prepare's U and W; additive: V (= X); vector decay:
        // stage 1's K̄ = k̂ ⊙ e^{b_C − b} and P (zero past the chunk's end) too ----
        const bool us_copied = kDelta || maps.v_tma;  // Us (U, or additive V) by the copy engine
        if (loader) {
            uint32_t bytes = 2 * padded_box_bytes(K, V, 2) + (maps.do_tma ? padded_box_bytes(kChunk, V, 2) : 0) +
                             (us_copied ? padded_box_bytes(kChunk, V, 2) : 0) +
                             (kDelta ? padded_box_bytes(kChunk, K, 2) : 0) +
                             (kVec ? padded_box_bytes(kChunk, K, 2) + padded_box_bytes(kChunk, kChunk, 2) : 0);
            uint64_t* bar = bars + kBarOperands;
            tma::mbar_expect(bar, bytes);
            tma::load_2d(S0s, &maps.S0, 0, int(slot) * K, bar);
            tma::load_2d(dSs, &maps.dS, 0, int(slot) * K, bar);
            if (maps.do_tma) tma::load_4d(dOs, &maps.d_o, 0, hv, ci.start, ci.batch, bar);
            if constexpr (kDelta) {
                tma::load_2d(Us, &maps.U, 0, int(slot) * kChunk, bar);
                tma::load_2d(Ws, &maps.W, 0, int(slot) * kChunk, bar);
            } else if (maps.v_tma) {
                tma::load_4d(Us, &maps.v, 0, hv, ci.start, ci.batch, bar);
            }
            if constexpr (kVec) {
                tma::load_2d(Ks, &maps.Kd, 0, int(slot) * kChunk, bar);
                tma::load_2d(Pb, &maps.P, 0, int(slot) * kChunk, bar);
            }
        }
        if (!maps.do_tma) {
            const E* dsrc = static_cast<const E*>(p.d_o) + tok(p.dos, ci.batch, ci.start, hv);
            if (p.do_dt == DType::BF16) {
                stage_rows<V, kMmaThreads>(dOs, LDV, dsrc, p.dos[1], len);
            } else {
                for (int idx = tid; idx < kChunk * V; idx += kMmaThreads) {
                    const int r = idx / V, c = idx % V;
                    const float x = r < len ? load_any(p.d_o, p.do_dt, tok(p.dos, ci.batch, ci.start + r, hv) + c) : 0.f;
                    dOs[r * LDV + c] = __float2bfloat16(x);
                }
            }
        }
        if (!us_copied)
            stage_rows<V, kMmaThreads>(Us, LDV, static_cast<const E*>(p.v) + tok(p.vs, ci.batch, ci.start, hv), p.vs[1], len);
        cp_async_commit();
        // gates (fp64 in-chunk sums, warp 0: two tokens per lane; vector decay: the second kernel's) and β
        if (warp == 0 && !kVec) {
            double a[2] = {0.0, 0.0};
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = 2 * lane + e;
                if (i >= len) continue;
                if (p.decay == Decay::Scalar) {
                    float x = in[e];
                    if (gated) {
                        x += static_cast<const float*>(p.dt_bias)[hv * p.dtb_s];
                        gin[i] = x;
                        x = gate_log_decay(p.gate_act, p.lower_bound, x, static_cast<const float*>(p.A_log)[hv * p.alog_s]);
                    }
                    a[e] = x;
                } else if (p.decay == Decay::Fixed) {
                    a[e] = in[e];
                }
            }
            const auto [b0, b1, bC] = warp_chunk_log_decay(a[0], a[1], lane);
            bsm[2 * lane] = b0;
            bsm[2 * lane + 1] = b1;
            gam[2 * lane] = expf(float(b0));
            gam[2 * lane + 1] = expf(float(b1));
            kap[2 * lane] = expf(float(bC - b0));
            kap[2 * lane + 1] = expf(float(bC - b1));
        } else if (warp == 1 || warp == 2) {
            const int i = (warp - 1) * 32 + lane;
            braw[i] = in[0];
            betas[i] = kDelta && i < len ? beta_value(p.beta_act, in[0]) : 0.f;
        } else if (warp == 3) {
            for (int i = lane; i < kChunk; i += 32) dpd[i] = us[i] = ws_[i] = dbs[i] = 0.f;
            if (lane < 9) misc[lane] = 0.f;
        }
        if constexpr (!kVec) {
            if (hv == h * p.G) {  // q̂, k̂ of the chunk, shared by the group
                tma::mbar_wait(bars + kBarQK, 0);
                cp_async_wait_group<1>();  // the block's own copies of q and k, when they are not the copy engine's
                __syncthreads();
                normalize_qk_rows<K, LDK, kMmaThreads>(Qs, Ks, inv_norm, p, len);
            }
        }
        __syncthreads();  // q̂, k̂, the decay and β are complete; the operands may still be landing

        // ---- P and D: rows row0.., columns jc0.. (NTC n-tiles); kept in registers ----
        float Pr[1][NTC][4], Dr[1][NTC][4];
        auto gamma_ij = [&](int i, int j) { return expf(float(bsm[i] - bsm[j])); };
        if constexpr (kVec) {
            zero_acc(Pr);  // (read only by the one-number-per-token dg below)
            if constexpr (kDelta) {
                const float* Dg = p.Dm + slot * kChunk * kChunk;
                for_each_acc(Dr, [&](int r, int c, float& x) { x = Dg[(row0 + r) * kChunk + jc0 + c]; });
            }
        } else {
            zero_acc(Pr);
            warp_gemm<E, 1, NTC>(Pr, Tile<E>{Qs + row0 * LDK, LDK, 1}, Tile<E>{Ks + jc0 * LDK, 1, LDK}, K);
            if constexpr (kDelta) {
                zero_acc(Dr);
                warp_gemm<E, 1, NTC>(Dr, Tile<E>{Ks + row0 * LDK, LDK, 1}, Tile<E>{Ks + jc0 * LDK, 1, LDK}, K);
            }
            // one Γ_ij for both products, two columns a step
            for_each_acc_pair(Pr, [&](int r, int c, float& x0, float& x1) {
                const int i = row0 + r, j = jc0 + c;
                const float g0 = j <= i ? gamma_ij(i, j) : 0.f, g1 = j + 1 <= i ? gamma_ij(i, j + 1) : 0.f;
                x0 = j <= i ? x0 * g0 : 0.f;
                x1 = j + 1 <= i ? x1 * g1 : 0.f;
                *reinterpret_cast<__nv_bfloat162*>(Pb + i * LDC + j) = __floats2bfloat162_rn(x0, x1);
                if constexpr (kDelta) {
                    float* d = &Dr[0][c >> 3][(r >> 3) * 2];
                    d[0] = j < i ? d[0] * g0 : 0.f;
                    d[1] = j + 1 < i ? d[1] * g1 : 0.f;
                }
            });
        }
        // ---- the operands have landed ----
        tma::mbar_wait(bars + kBarOperands, parity);
        cp_async_wait_all();
        if (len < kChunk) {  // a box reads on into the next sequence's tokens
            if (maps.do_tma) zero_rows_from<V, kMmaThreads>(dOs, LDV, len);
            if (!kDelta && maps.v_tma) zero_rows_from<V, kMmaThreads>(Us, LDV, len);
        }
        // Σ S0 ⊙ dS_C (the state's own decay over the chunk, for dg); per key row with vector decay
        if constexpr (kVec) {
            // kMmaThreads / K lanes a row, lane q taking the row's 16-byte pieces q, q + that, ...
            constexpr int LPR = kMmaThreads / K, PR = V / 8;
            static_assert(LPR * K == kMmaThreads && 32 % LPR == 0 && PR % LPR == 0, "bwd mma: lanes a key row");
            const int r = tid / LPR, q = tid % LPR;
            float s = 0.f;
#pragma unroll
            for (int j = q; j < PR; j += LPR) {
                const uint4 a = *reinterpret_cast<const uint4*>(S0s + r * LDV + 8 * j);
                const uint4 b = *reinterpret_cast<const uint4*>(dSs + r * LDV + 8 * j);
                const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) s += unpack_elem<E>(aw, e) * unpack_elem<E>(bw, e);
            }
            s = lane_group_sum<LPR>(s);
            if (q == 0) p.v_sd[slot * K + r] = s;
        } else if (p.decay != Decay::None) {
            float s = 0.f;
            for (int idx = tid; idx < K * V / 2; idx += kMmaThreads) {
                const int r = idx / (V / 2), c = 2 * (idx % (V / 2));
                const float2 a = load_pair(S0s + r * LDV + c), b = load_pair(dSs + r * LDV + c);
                s += a.x * b.x + a.y * b.y;
            }
            s = lane_group_sum<32>(s);
            if (lane == 0) atomicAdd(misc, s);
        }
        __syncthreads();  // P (bf16) and the block's own operand copies are complete

        // ---- X (delta: U − W S0) and dX = Pᵀ dO + diag(κ) k̂ dS_C: rows row0.., columns vc0.. ----
        {
            if constexpr (kDelta) {
                float X[1][NTV][4];
                zero_acc(X);
                warp_gemm<E, 1, NTV>(X, Tile<E>{Ws + row0 * LDK, LDK, 1}, Tile<E>{S0s + vc0, LDV, 1}, K);
                for_each_acc_pair(X, [&](int r, int c, float x0, float x1) {
                    const int i = row0 + r, e = vc0 + c;
                    const float2 u = load_pair(Us + i * LDV + e);
                    *reinterpret_cast<__nv_bfloat162*>(Xs + i * LDV + e) = __floats2bfloat162_rn(u.x - x0, u.y - x1);
                });
                // ---- T = (I + A)^{-1}, A = diag(β) D: prepare's (stage 1), into U and W's bytes, which
                // every warp has read by now; it lands while dX is formed ----
                __syncthreads();
                if (loader) {
                    tma::mbar_expect(bars + kBarT, padded_box_bytes(kChunk, kChunk, 4));
                    tma::load_2d(Tm, &maps.T, 0, int(slot) * kChunk, bars + kBarT);
                }
            }
            float A1[1][NTV][4], A2[1][NTV][4];
            zero_acc(A1);
            zero_acc(A2);
            warp_gemm<E, 1, NTV>(A1, Tile<E>{Pb + row0, 1, LDC}, Tile<E>{dOs + vc0, LDV, 1}, kChunk);
            warp_gemm<E, 1, NTV>(A2, Tile<E>{Ks + row0 * LDK, LDK, 1}, Tile<E>{dSs + vc0, LDV, 1}, K);
            const int64_t dv0 = !kDelta && p.dv ? tok(p.dvs, ci.batch, ci.start, hv) + vc0 : 0;
            for_each_acc_pair(A1, [&](int r, int c, float x0, float x1) {
                const int i = row0 + r, e = vc0 + c;
                const float* a2 = &A2[0][c >> 3][(r >> 3) * 2];
                const float f = kVec ? 1.f : kap[i];
                const float dx0 = x0 + f * a2[0], dx1 = x1 + f * a2[1];
                if constexpr (kDelta) {
                    *reinterpret_cast<float2*>(dXf + i * LDVF + e) = make_float2(dx0, dx1);
                } else if (p.dv && i < len) {
                    store_pair_any(p.dv, p.dv_dt, dv0 + int64_t(i) * p.dvs[1] + c, dx0, dx1);
                }
            });
        }
        __syncthreads();  // X and dX complete; U, W are dead

        if constexpr (kDelta) {
            // v at Z's fragment positions, two columns a 32-bit load, in flight with T's copy (loaded
            // after Z they were ~7% of the kernel's stall samples)
            const E* vrow = static_cast<const E*>(p.v) + tok(p.vs, ci.batch, ci.start, hv) + vc0;
            __nv_bfloat162 vv[NTV][2];  // for_each_acc_pair's (row, column) = (g + 8h, 8j + 2t) -> vv[j][h]
#pragma unroll
            for (int j = 0; j < NTV; ++j)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int i = row0 + (lane >> 2) + 8 * hh;
                    vv[j][hh] = i < len ? load_bf16x2(vrow + int64_t(i) * p.vs[1] + 8 * j + 2 * (lane & 3))
                                        : __floats2bfloat162_rn(0.f, 0.f);
                }
            tma::mbar_wait(bars + kBarT, parity);
            // ---- Z = Tᵀ dX (tf32); dv = diag(β) Z; dβ_i gets ⟨Z_i, v_i⟩ ----
            float Z[1][NTV][4];
            zero_acc(Z);
            warp_gemm<float, 1, NTV, false>(Z, Tile<float>{Tm + row0, 1, LDF}, Tile<float>{dXf + vc0, LDVF, 1}, kChunk);
            // two columns a step: 32-bit stores of dv (per element this was a sixth of the kernel's
            // stall samples)
            const int64_t dv0 = p.dv ? tok(p.dvs, ci.batch, ci.start, hv) + vc0 : 0;
            float sz[2] = {0.f, 0.f};
            for_each_acc_pair(Z, [&](int r, int c, float x0, float x1) {
                const int i = row0 + r;
                if (i >= len) return;
                if (p.dv) store_pair_any(p.dv, p.dv_dt, dv0 + int64_t(i) * p.dvs[1] + c, betas[i] * x0, betas[i] * x1);
                const float2 v2 = __bfloat1622float2(vv[c >> 3][r >> 3]);
                sz[r >> 3] += x0 * v2.x + x1 * v2.y;
            });
            add_fragment_row_sums(sz, dbs, row0);
            __syncthreads();  // every read of dX is done: Z replaces it
            for_each_acc(Z, [&](int r, int c, float& x) { Zs[(row0 + r) * LDV + vc0 + c] = __float2bfloat16(x); });
            __syncthreads();
        }

        // ---- key-wide products: dO S0ᵀ, Z S0ᵀ, X dS_Cᵀ (rows row0.., key columns kc0..) ----
        {
            float acc[1][NTK][4];
            zero_acc(acc);
            warp_gemm<E, 1, NTK>(acc, Tile<E>{dOs + row0 * LDV, LDV, 1}, Tile<E>{S0s + kc0 * LDV, 1, LDV}, V);
            if constexpr (kVec) {
                // raw, for the second kernel: the decay factors are per element there
                const size_t at = slot * kChunk * K + size_t(row0) * K + kc0;
                store_acc(acc, p.v_dqg + at, K);
                if constexpr (kDelta) {
                    zero_acc(acc);
                    warp_gemm<E, 1, NTK>(acc, Tile<E>{Zs + row0 * LDV, LDV, 1}, Tile<E>{S0s + kc0 * LDV, 1, LDV}, V);
                    store_acc(acc, p.v_m + at, K);
                }
                zero_acc(acc);
                warp_gemm<E, 1, NTK>(acc, Tile<E>{Xs + row0 * LDV, LDV, 1}, Tile<E>{dSs + kc0 * LDV, 1, LDV}, V);
                store_acc(acc, p.v_dkb + at, K);
            } else {
                // dq_i += γ_i (dO S0ᵀ)_i and u_i += γ_i ⟨q̂_i, (dO S0ᵀ)_i⟩
                float su[2] = {0.f, 0.f};
                add_scaled_rows(dq, acc, Qs + kc0, LDK, row0, su, [&](int i) { return make_float2(gam[i], gam[i]); });
                add_fragment_row_sums(su, us, row0);
                if constexpr (kDelta) {
                    zero_acc(acc);
                    warp_gemm<E, 1, NTK>(acc, Tile<E>{Zs + row0 * LDV, LDV, 1}, Tile<E>{S0s + kc0 * LDV, 1, LDV}, V);
                    // dk_i −= γ_i β_i M_i; u_i −= γ_i β_i ⟨k̂_i, M_i⟩ and dβ_i −= γ_i ⟨k̂_i, M_i⟩: one row sum,
                    // split after
                    float s[2] = {0.f, 0.f};
                    add_scaled_rows(dk, acc, Ks + kc0, LDK, row0, s,
                                    [&](int i) { return make_float2(-gam[i] * betas[i], gam[i]); });
                    reduce_fragment_row_sums(s);
                    if ((lane & 3) == 0) {
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            const int i = row0 + (lane >> 2) + 8 * hh;
                            atomicAdd(us + i, -betas[i] * s[hh]);
                            atomicAdd(dbs + i, -s[hh]);
                        }
                    }
                }
                zero_acc(acc);
                warp_gemm<E, 1, NTK>(acc, Tile<E>{Xs + row0 * LDV, LDV, 1}, Tile<E>{dSs + kc0 * LDV, 1, LDV}, V);
                float sw[2] = {0.f, 0.f};
                add_scaled_rows(dk, acc, Ks + kc0, LDK, row0, sw, [&](int i) { return make_float2(kap[i], kap[i]); });
                add_fragment_row_sums(sw, ws_, row0);
            }
        }

        // ---- dP = dO Xᵀ, dA = −Z Xᵀ (rows row0.., columns jc0..) ----
        float dPr[1][NTC][4], dAr[1][NTC][4];
        zero_acc(dPr);
        warp_gemm<E, 1, NTC>(dPr, Tile<E>{dOs + row0 * LDV, LDV, 1}, Tile<E>{Xs + jc0 * LDV, 1, LDV}, V);
        if constexpr (kDelta) {
            zero_acc(dAr);
            warp_gemm<E, 1, NTC>(dAr, Tile<E>{Zs + row0 * LDV, LDV, 1}, Tile<E>{Xs + jc0 * LDV, 1, LDV}, V);
            for_each_acc(dAr, [](int, int, float& x) { x = -x; });
        }
        if constexpr (kVec) {
            // dP (its diagonal fp32, the strict lower part as the second kernel's bf16 operand), dD =
            // diag(β) dA (strict lower, bf16) and dβ's Σ_j dA_ij D_ij; the rest is the second kernel's
            const size_t at = slot * kChunk * kChunk + size_t(row0) * kChunk + jc0;
            for_each_acc(dPr, [&](int r, int c, float& x) {
                const int i = row0 + r, j = jc0 + c;
                if (j == i) p.v_dpd[slot * kChunk + i] = x;
                if (j >= i) x = 0.f;
            });
            store_acc<E>(dPr, p.v_dp + at, kChunk);
            if constexpr (kDelta) {
                float sb[2] = {0.f, 0.f};
                for_each_acc(dAr, [&](int r, int c, float& x) {
                    const int i = row0 + r, j = jc0 + c;
                    const float d = Dr[0][c >> 3][(r >> 3) * 2 + (c & 1)];
                    sb[r >> 3] += j < i ? x * d : 0.f;
                    x = j < i ? betas[i] * x : 0.f;
                });
                store_acc<E>(dAr, p.v_dd + at, kChunk);
                add_fragment_row_sums(sb, dbs, row0);
                __syncthreads();  // dβ's partial sums complete
                if (tid < kChunk) p.v_db[slot * kChunk + tid] = dbs[tid];
            }
            if (hv + 1 < (h + 1) * p.G) wg::fence_proxy_async();  // the next value head's copies overwrite the zeroed rows
            __syncthreads();  // the chunk's shared memory is the next value head's
            continue;
        }
        __syncthreads();  // S0, dS_C, dO, X, Z are dead: E1, E, F take their place
        {
            // E1, F two columns a store; E = dD ⊙ Γ + its transpose element by element: every (i, j), j < i,
            // writes (i, j) and (j, i), the diagonal writes its zero, so no position is left to clear first
            float sb[2] = {0.f, 0.f};
            for_each_acc_pair(dPr, [&](int r, int c, float& x0, float& x1) {
                const int i = row0 + r, j = jc0 + c, q = (r >> 3) * 2;
                float e1[2], f[2];
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int jj = j + u;
                    const float x = u ? x1 : x0;
                    const float gij = jj < i ? gamma_ij(i, jj) : 0.f;
                    if (jj == i) dpd[i] = x;
                    e1[u] = x * gij;
                    f[u] = jj < i ? x * Pr[0][c >> 3][q + u] : 0.f;
                    if constexpr (kDelta) {
                        const float da = dAr[0][c >> 3][q + u], d = Dr[0][c >> 3][q + u];
                        if (jj < i) {
                            const float dd = betas[i] * da;
                            sb[r >> 3] += da * d;
                            f[u] += dd * d;
                            const E e = __float2bfloat16(dd * gij);
                            E2b[i * LDC + jj] = e;
                            E2b[jj * LDC + i] = e;
                        } else if (jj == i) {
                            E2b[i * LDC + i] = __float2bfloat16(0.f);
                        }
                    }
                }
                *reinterpret_cast<__nv_bfloat162*>(E1b + i * LDC + j) = __floats2bfloat162_rn(e1[0], e1[1]);
                *reinterpret_cast<float2*>(Fm + i * LDF + j) = make_float2(f[0], f[1]);
            });
            if constexpr (kDelta) add_fragment_row_sums(sb, dbs, row0);
        }
        __syncthreads();

        // ---- dq += E1 k̂ + diag(dP) k̂;  dk += E1ᵀ q̂ + diag(dP) q̂ + (E + Eᵀ) k̂ ----
        warp_gemm<E, 1, NTK>(dq, Tile<E>{E1b + row0 * LDC, LDC, 1}, Tile<E>{Ks + kc0, LDK, 1}, kChunk);
        warp_gemm<E, 1, NTK>(dk, Tile<E>{E1b + row0, 1, LDC}, Tile<E>{Qs + kc0, LDK, 1}, kChunk);
        if constexpr (kDelta) warp_gemm<E, 1, NTK>(dk, Tile<E>{E2b + row0 * LDC, LDC, 1}, Tile<E>{Ks + kc0, LDK, 1}, kChunk);
        for_each_acc(dq, [&](int r, int c, float& x) { x += dpd[row0 + r] * __bfloat162float(Ks[(row0 + r) * LDK + kc0 + c]); });
        for_each_acc(dk, [&](int r, int c, float& x) { x += dpd[row0 + r] * __bfloat162float(Qs[(row0 + r) * LDK + kc0 + c]); });

        // ---- dβ and dg of the chunk, the per-head parameter sums: TPR threads a row or token (one thread
        // a token left seven eighths of the block waiting at the barrier) ----
        constexpr int TPR = kMmaThreads / kChunk, PW = kChunk / TPR;
        static_assert(TPR * kChunk == kMmaThreads && 32 % TPR == 0 && PW % 4 == 0, "bwd mma: dg thread layout");
        const int trow = tid / TPR, part = tid % TPR;
        if (p.decay != Decay::None) {
            // F → its exclusive prefix sums along each row, R_i(t) = Σ_{j<t} F_ij: PW entries a thread,
            // the parts' totals scanned across the row's TPR lanes
            float f[PW], loc = 0.f;
            float* fr = Fm + trow * LDF + part * PW;
#pragma unroll
            for (int k = 0; k < PW; k += 4) {
                const float4 x = *reinterpret_cast<const float4*>(fr + k);
                f[k] = x.x, f[k + 1] = x.y, f[k + 2] = x.z, f[k + 3] = x.w;
            }
#pragma unroll
            for (int k = 0; k < PW; ++k) loc += f[k];
            float incl = loc;
#pragma unroll
            for (int off = 1; off < TPR; off <<= 1) {
                const float n = __shfl_up_sync(0xffffffffu, incl, off, TPR);
                if (part >= off) incl += n;
            }
            float run = incl - loc;
#pragma unroll
            for (int k = 0; k < PW; ++k) {
                const float x = f[k];
                f[k] = run;
                run += x;
            }
#pragma unroll
            for (int k = 0; k < PW; k += 4) *reinterpret_cast<float4*>(fr + k) = make_float4(f[k], f[k + 1], f[k + 2], f[k + 3]);
            __syncthreads();
        }
        {
            const int t = trow;
            // dg_t − c: Σ_{i≥t} (R_i(t) + u_i) + Σ_{j<t} w_j, rows and columns strided over the TPR lanes
            float s = 0.f;
            if (p.decay != Decay::None && t < len) {
                for (int i = part; i < kChunk; i += TPR)
                    if (i >= t) s += Fm[i * LDF + t] + us[i];
                for (int j = part; j < t; j += TPR) s += ws_[j];
            }
            s = lane_group_sum<TPR>(s);
            float dgx = 0.f, dal = 0.f;
            if (part == 0) {
                if (kDelta && p.dbeta && t < len)
                    p.dbeta[tok(p.dbs, ci.batch, ci.start + t, hv)] = dbs[t] * beta_derivative(p.beta_act, braw[t]);
                if (p.decay != Decay::None && t < len) {
                    const float dgt = gam[kChunk - 1] * misc[0] + s;
                    dgx = dgt;
                    if (gated) {
                        float d_dx = 1.f, d_dalog = 0.f;
                        gate_derivatives(p.gate_act, p.lower_bound, gin[t], static_cast<const float*>(p.A_log)[hv * p.alog_s],
                                         &d_dx, &d_dalog);
                        dal = dgt * d_dalog;
                        dgx = dgt * d_dx;
                    }
                    if (p.dg && p.decay == Decay::Scalar) p.dg[tok(p.dgs, ci.batch, ci.start + t, hv)] = dgx;
                }
            }
            // block sums of the chunk (one value a token, in the lanes with part 0)
            dgx = lane_group_sum<32>(dgx);
            dal = lane_group_sum<32>(dal);
            if (lane == 0) {
                misc[1 + 2 * warp] = dgx;
                misc[2 + 2 * warp] = dal;
            }
        }
        __syncthreads();
        if (tid == 0) {
            double sx = 0.0, sa = 0.0;
            for (int w = 0; w < kMmaThreads / 32; ++w) {
                sx += double(misc[1 + 2 * w]);
                sa += double(misc[2 + 2 * w]);
            }
            if (p.decay == Decay::Fixed) atomicAdd(p.params_acc + hv, sx);
            else if (gated) {
                atomicAdd(p.params_acc + 2 * p.HV + hv, sx);
                atomicAdd(p.params_acc + p.HV + hv, sa);
            }
        }
        // the next value head's copies overwrite E1, E, F and the zeroed rows: this thread's generic
        // writes (bytes that were only read need no fence, the barrier orders them)
        if (hv + 1 < (h + 1) * p.G) wg::fence_proxy_async();
        __syncthreads();  // the chunk's shared memory is the next value head's
    }

    // ---- dq, dk through the scale and the in-kernel L2 norm ----
    if constexpr (!kVec) store_dq_dk<K, LDK, kMmaThreads, kMmaThreads / kChunk>(dq, dk, stage, Qs, Ks, inv_norm, p, ci, h);
}

}  // namespace bwd

// The inputs' views that stage 3's tensor maps read besides Params' workspace pointers.
struct Stage3Views {
    TensorView q, k, v, d_o;
};

// A [slots·rows, cols] workspace matrix (bf16, or fp32) in padded boxes of rows × cols plus
// kBoxPadBytes of zeros.
inline void encode_padded_slot_rows(CUtensorMap* map, const void* base, size_t slots, int rows, int cols, bool fp32,
                                    const char* op, const char* what) {
    const int elem = fp32 ? 4 : 2;
    const uint64_t dims[2] = {uint64_t(cols), uint64_t(slots) * rows}, strides[1] = {uint64_t(cols) * elem};
    const uint32_t box[2] = {uint32_t(cols + bwd::kBoxPadBytes / elem), uint32_t(rows)};
    tma::encode(map, fp32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, 2, dims, strides, box,
                CU_TENSOR_MAP_SWIZZLE_NONE, op, what);
}
// A bf16 input's rows (rows_tma_ready) in padded boxes of a head's 64 tokens × D plus kBoxPadBytes of
// zeros.
inline void encode_padded_input_rows(CUtensorMap* map, const TensorView& x, const char* op, const char* what) {
    const InputRows g = input_row_geometry(x);
    const uint32_t box[4] = {uint32_t(x.shape[3] + bwd::kBoxPadBytes / 2), 1, uint32_t(kChunk), 1};
    tma::encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, x.data, 4, g.dims, g.strides, box, CU_TENSOR_MAP_SWIZZLE_NONE, op,
                what);
}

// Stage3Maps of a launch: the workspace blocks' maps always, the inputs' where rows_tma_ready.
template <Update Up, bool kVec, int K, int V>
bwd::Stage3Maps make_stage3_maps(const bwd::Params& p, const Stage3Views& x, const char* op) {
    constexpr bool kDelta = Up == Update::Delta;
    bwd::Stage3Maps m{};
    const size_t slots = size_t(p.n_chunks) * size_t(p.HV);
    HLA_CHECK(p.n_chunks > 0, op, ": stage 3 launched without a chunk");
    HLA_CHECK(slots * size_t(std::max(K, int(kChunk))) < (size_t(1) << 31), op, ": ", p.n_chunks, " chunks × ", p.HV,
              " value heads exceed the CUDA backward's 2^31 rows of per-chunk states");
    encode_padded_slot_rows(&m.S0, p.states, slots, K, V, false, op, "the chunk-start states");
    encode_padded_slot_rows(&m.dS, p.dstates, slots, K, V, false, op, "the chunk-end state gradients");
    if (kDelta) {
        encode_padded_slot_rows(&m.U, p.U, slots, kChunk, V, false, op, "prepare's U");
        encode_padded_slot_rows(&m.W, p.Wm, slots, kChunk, K, false, op, "prepare's W");
        encode_padded_slot_rows(&m.T, p.Tinv, slots, kChunk, kChunk, true, op, "prepare's T");
    }
    if (kVec) {
        encode_padded_slot_rows(&m.Kd, p.Kd, slots, kChunk, K, false, op, "prepare's decayed keys");
        encode_padded_slot_rows(&m.P, p.P, slots, kChunk, kChunk, false, op, "prepare's scores");
    }
    m.qk_tma = !kVec && rows_tma_ready(x.q) && rows_tma_ready(x.k);
    if (m.qk_tma) {
        encode_padded_input_rows(&m.q, x.q, op, "q");
        encode_padded_input_rows(&m.k, x.k, op, "k");
    }
    m.do_tma = x.d_o.dtype == DType::BF16 && rows_tma_ready(x.d_o);
    if (m.do_tma) encode_padded_input_rows(&m.d_o, x.d_o, op, "d_o");
    m.v_tma = !kDelta && rows_tma_ready(x.v);
    if (m.v_tma) encode_padded_input_rows(&m.v, x.v, op, "v");
    return m;
}

template <Update Up, bool kVec, int K, int V>
void launch_backward_mma_kv(const bwd::Params& p, const Stage3Views& x, const char* op) {
    constexpr size_t smem = bwd::MmaLayout<Up, K, V>::bytes;
    const bwd::Stage3Maps maps = make_stage3_maps<Up, kVec, K, V>(p, x, op);
    raise_smem_limit<bwd::chunk_bwd_mma_kernel<Up, kVec, K, V>>(smem, op);
    bwd::chunk_bwd_mma_kernel<Up, kVec, K, V><<<dim3(p.n_chunks, p.H), bwd::kMmaThreads, smem, launch_stream()>>>(p, maps);
    check_cuda(cudaGetLastError(), op, "chunk_bwd_mma launch");
}

// Stage 3 on tensor cores for bf16 inputs and a decay of one number per token (instantiated in
// bwd_mma_<update>.cu).
template <Update Up>
void launch_backward_mma(const bwd::Params& p, const Stage3Views& x, const char* op) {
    if (p.K == 64) {
        if (p.V == 64) return launch_backward_mma_kv<Up, false, 64, 64>(p, x, op);
        return launch_backward_mma_kv<Up, false, 64, 128>(p, x, op);
    }
    if (p.V == 64) return launch_backward_mma_kv<Up, false, 128, 64>(p, x, op);
    return launch_backward_mma_kv<Up, false, 128, 128>(p, x, op);
}

}  // namespace hla::linear::cuda
