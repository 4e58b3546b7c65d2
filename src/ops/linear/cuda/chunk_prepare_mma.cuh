// hla — chunk_prepare for bf16 inputs on 16-bit tensor cores (SPECS.md §1, "Chunked forward").
//
// The same outputs as the fp32 chunk_prepare_kernel (chunk_fwd.cuh) — per (chunk of 64 tokens, value
// head): Qg = sQ⊙γ, Kd = K⊙γ_C⊘γ, the masked scores P, γ_C, and for the delta rule
// W = L diag(β)(K⊙γ), U = L diag(β) V with L = (I + A)^{-1} — built for speed instead of generality:
//
// - With FwdParams::qk_rowf (forward, one decay number per token) Qg and Kd are not written: the
//   scan reads q and k raw and applies the per-row factors stored instead (and V itself for U = V).
//   With FwdParams::Tw (the delta rule) U is not written, nor is v read: T = L diag(β) is written
//   instead, as rounded for the products here, and the scan forms U from it; with raw operands too,
//   W as well, and with vector decay W from the K⊙γ written instead (FwdParams::Kg).
// - 4 warps, warp w owns the rows [16w, 16w + 16) of the chunk: its row block of P, A, W and U, its
//   share of Qg and Kd, and (inverse) diagonal block w of L. Most phases need no block barrier at all.
// - q and k stay in shared memory as the raw bf16 inputs (cp.async); the L2 norms, the scale and β
//   are applied to the fp32 products instead of the operands: one rounding fewer than normalising in
//   place, and a quarter of the shared memory of the fp32 kernel. v (delta rule) is fetched into k's
//   bytes once Qg, Kd and K⊙γ are formed, while the inverse runs. At most 74 KiB per block: 3 blocks
//   (12 warps) per SM for every cell.
// - Products are mma.sync m16n8k16 bf16 with fp32 accumulation. With one decay number per token the
//   operands come straight from shared memory (ldmatrix) and exp(b_i − b_j) multiplies the fp32 result.
//   With vector decay the decay sits inside the dot product, so each operand fragment is formed in
//   registers: raw element × exp(exponent) in fp32, rounded once to bf16.
// - The inverse: 16×16 diagonal blocks by forward substitution (one lane per column), then the blocks
//   below the diagonal with tf32 mma as the 2×2 block inverse of the 32-row halves, every warp busy
//   in both of its steps (L_IJ = −L_II · A_I,[J,I) · L_[J,I),J, grouped; see the inverse below).
//
// Vector-decay numerics (the factoring that keeps g = −1000 safe). b_i is the in-chunk cumulative
// log decay, kept per row block I (reference row r_I = 16I) as Δ_i = b_i − b_{r_I} in fp32. The block
// references R_I = b_{r_I} are stored as R_0 and the block sums S_I = R_{I+1} − R_I (the in-block
// sums compensated, as accurate as fp64's, then rounded once to fp32), so every exponent below is a
// sum of one-signed terms, a difference of nearby values, or one that underflows harmlessly to 0:
//   scores, row block I, column block J < I:  (q_i e^{Δ_i}) · (k_j e^{(R_I − R_J) − Δ_j})   both ≤ 1
//   column block J = I (the diagonal):         (q_i e^{Δ_i}) · (k_j e^{−Δ_j})   the second ≤ e^{span}
//   Qg: q e^{R_I + Δ_i},   Kd: k e^{(b_C − R_I) − Δ_i},   K⊙γ for W: k e^{R_I + Δ_i}.
// When a block's decay span exceeds e^80 in any channel (g = −1000 does), its diagonal scores are
// computed entry by entry with e^{Δ_i − Δ_j} ≤ 1 instead (slow, exact, only for such chunks).
// Either way P_ii itself is q_i·k_i of the raw inputs in fp32 (no decay, no operand rounding).
//
// Vector decay, chunks whose whole decay span b_0 − b_C is at most kFastSpan in every channel (the
// common case; the factoring above is the fallback): one reference m = (b_0 + b_C)/2 per channel for
// the whole chunk, so that the decayed operands qa = q e^{b_i − m}, ka = k e^{b_i − m} and
// kb = k e^{m − b_j} all lie within e^{±kFastSpan/2} of the raw values (no overflow, no underflow)
// and each is rounded once to bf16. They are formed once per element in the same pass as Qg, Kd and
// K⊙γ (instead of once per warp and column block inside the products), written to shared memory, and
// the scores become plain ldmatrix + mma products as for the scalar decays: P = qa kbᵀ, A = ka kbᵀ,
// the ten 16×16 blocks on and below the diagonal dealt 3/3/2/2 over the warps (not by row block).
// Products j ≤ i are e^{b_i − b_j} ≤ 1 times q·k as before; the masked ones (j > i) may be large or
// even overflow in fp32 and are discarded by a select.
// The in-chunk sums Δ and S_I themselves come from the tensor cores when the gates are bf16 without
// an activation (decay_sums_mma: exact products summed in fp32, a few ulps); a chunk spanning more than
// kFastSpan is summed again with the compensated sums above before the factored path uses them.
#pragma once

#include <algorithm>

#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/common.cuh"
#include "ops/linear/cuda/fwd_params.cuh"

namespace hla::linear::cuda {

constexpr int kPrepMmaThreads = 128;  // 4 warps: one per 16-row block of the chunk
// The single-reference scores (see above) for chunks whose decay span is at most this in every
// channel: operands within e^{±60} of the raw values, far from bf16's range limits (e^{±87}).
constexpr float kFastSpan = 120.f;
constexpr int kSlowChunk = 1 << 4;  // flag beside the wide-block bits 0-3: some channel spans more than kFastSpan

template <Decay D, Update Up, int K>
struct PrepMmaLayout {
    static constexpr bool kVec = D == Decay::Vector, kDelta = Up == Update::Delta;
    static constexpr int LDH = K + 8;        // bf16 rows of q, k: 16-byte pad, ldmatrix and fragment loads conflict-free
    static constexpr int LDV = 128 + 8;      // bf16 rows of v (V ≤ 128)
    // fp32 rows of Δ (vector decay): float2 fragment loads conflict-free per half-warp. 136 floats
    // whatever K ≤ 128, so that each row can later hold, without touching another row, a row of L
    // (64 floats, bytes [0, 256)) and a row of K⊙γ (bf16, bytes [256, 256 + 2K)).
    static constexpr int LDF = 128 + 8;
    static constexpr int LDA = kChunk + 4;   // fp32 rows of A and L
    static constexpr int KG_OFF = 128;       // vector decay: K⊙γ row i at bf16 element i·2·LDF + KG_OFF of Δ's bytes
    static_assert(K <= 128 && kChunk + 4 <= LDF, "chunk_prepare_mma: Δ's rows must hold a row of L and one of K⊙γ");
    static constexpr size_t q_off = 0;
    // raw q; vector decay: then qa (fast path), then A (delta rule) in the same bytes
    static constexpr size_t q_bytes =
        std::max(size_t(kChunk) * LDH * 2, kVec && kDelta ? size_t(kChunk) * LDA * 4 : size_t(0));
    // raw k (vector decay, fast path: then kb) until Qg, Kd and K⊙γ are formed, then v (delta rule:
    // U = L diag(β) V) in the same bytes; the additive update copies U = V without staging it
    static constexpr size_t k_off = q_off + q_bytes;
    static constexpr size_t k_bytes = std::max(size_t(kChunk) * LDH * 2, kDelta ? size_t(kChunk) * LDV * 2 : size_t(0));
    // vector decay: Δ until the scores are done (fast path: row by row, ka and K⊙γ take its bytes),
    // then L and K⊙γ, row i in row i's bytes; other decays: A and L (delta rule)
    static constexpr size_t f_off = k_off + k_bytes;
    static constexpr size_t f_bytes =
        kVec ? size_t(kChunk) * LDF * 4 : (kDelta ? 2 * size_t(kChunk) * LDA * 4 : size_t(0));
    // vector decay, bf16 gates without an activation: row block w's raw gate rows [16][LDH] (bf16) land
    // in the upper half of Δ's row block w, where warp w copies them and reads them on tensor cores
    // before it writes that block of Δ (decay_sums_mma): no other warp touches those bytes in between
    static constexpr size_t g_off(int w) { return f_off + size_t(16 * w + 8) * LDF * 4; }
    static_assert(!kVec || 16 * LDH * 2 <= 8 * LDF * 4, "chunk_prepare_mma: a row block's gate rows must fit half its Δ rows");
    // vector: per channel R_0 and the block sums S_I = R_{I+1} − R_I (S_3 = b_C − R_3), fp32; one
    // decay number per token: b_i in fp64
    static constexpr size_t t_off = f_off + f_bytes;
    static constexpr size_t t_bytes = kVec ? size_t(5) * K * 4 : size_t(kChunk) * 8;
    static constexpr size_t r_off = t_off + t_bytes;  // per row: β, rq, rk, e^{b_i}, e^{b_C − b_i}, q_i·k_i
    static constexpr size_t bytes = r_off + 6 * kChunk * 4 + 16;
    // 3 blocks per SM fit the shared memory of every cell at K = 128 (≤ 74 KiB each)
    static constexpr int kMinBlocks = 3;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// 16-byte asynchronous copy that writes zeros instead when `valid` is false (nothing is read then).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
    const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}

// The chunk's rows [first_row, first_row + ROWS) × COLS of a [.., COLS] view of T (bf16 or fp32; src
// its row 0, row stride row_stride elements) into shared memory (row stride ld) by THREADS threads
// (thread: this one's index among them), rows ≥ valid zero: asynchronous 16-byte copies when every row
// is 16-byte aligned, element copies otherwise. Shared by the prepare and the tensor-core backward.
template <int COLS, int THREADS, class T, int ROWS = kChunk>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* src, int64_t row_stride, int valid, int first_row = 0,
                                           int thread = threadIdx.x) {
    constexpr int VEC = 16 / sizeof(T), PR = COLS / VEC;  // elements a copy, copies a row
    if ((reinterpret_cast<uintptr_t>(src) % 16 == 0) && (row_stride % VEC == 0)) {
        // each thread keeps one 16-byte column of every RS-th row, a fixed count of rows unrolled, one
        // 64-bit address step a copy (session 17: a loop bounded by the thread's first row, compiled as
        // a remainder and a 4-way unrolled body, took a 64-bit row product and ~12 instructions a copy,
        // ~9% of KDA prepare's stall samples with the gate rows' copies)
        static_assert(THREADS % PR == 0 && ROWS % (THREADS / PR) == 0, "stage_rows: a thread keeps one column");
        constexpr int RS = THREADS / PR;
        const int c = thread % PR, r0 = thread / PR;
        const T* first = src + c * VEC;  // row 0: a valid address for the zero-filled rows
        const T* s = first + (first_row + r0) * row_stride;
        if (valid >= first_row + ROWS) {  // whole (uniform among the threads): no fill, no selects
#pragma unroll
            for (int n = 0; n < ROWS / RS; ++n, s += RS * row_stride) cp_async16(dst + (r0 + n * RS) * ld + c * VEC, s);
        } else {
#pragma unroll
            for (int n = 0; n < ROWS / RS; ++n, s += RS * row_stride) {
                const int r = r0 + n * RS;
                const bool in = first_row + r < valid;
                cp_async16_zfill(dst + r * ld + c * VEC, in ? s : first, in);
            }
        }
    } else {
        for (int idx = thread; idx < ROWS * COLS; idx += THREADS) {
            const int r = idx / COLS, c = idx % COLS;
            dst[r * ld + c] = first_row + r < valid ? src[(first_row + r) * row_stride + c] : static_cast<T>(0.f);
        }
    }
}

// 2^x, the multi-function unit's approximation (what __expf uses after its scaling by log2 e).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The gate rows [64][COLS] as fp32 into shared memory (row stride ld, rows ≥ valid zero): bf16 rows
// that allow 16-byte loads go through registers as load_rows does, but are stored as two float4 per
// 8 elements, the half of a 32-byte piece that comes first depending on bit 2 of the piece, so that
// each quarter-warp's 16-byte stores hit 32 distinct banks (load_rows' element stores collide 8-way
// at this row stride). fp32 rows are copied as they are, asynchronously (stage_rows, one commit
// group: the caller waits for it, cp_async_wait_all, before reading them; through registers, 64
// values a thread stored one by one, session 17). Other dtypes and layouts: load_rows_any.
template <int COLS, int THREADS>
__device__ __forceinline__ void stage_gate_rows(float* dst, int ld, const void* src, DType dtype, int64_t offset,
                                                int64_t row_stride, int valid) {
    if (dtype == DType::F32) {
        stage_rows<COLS, THREADS>(dst, ld, static_cast<const float*>(src) + offset, row_stride, valid);
        cp_async_commit();
        return;
    }
    if (dtype == DType::BF16) {
        const __nv_bfloat16* s = static_cast<const __nv_bfloat16*>(src) + offset;
        if ((reinterpret_cast<uintptr_t>(s) % 16 == 0) && (row_stride % 8 == 0)) {
            // each thread keeps one 16-byte column piece cv of every (THREADS / PR)-th row: one address
            // step a load (with a flat index, its division and 64-bit row product per load were ~40% of
            // this staging's instructions in KDA's prepare, session 16)
            constexpr int PR = COLS / 8, RS = THREADS / PR, NV = kChunk / RS;
            static_assert(THREADS % PR == 0 && kChunk % RS == 0, "stage_gate_rows: the rows must split evenly");
            const int cv = threadIdx.x % PR, row0 = threadIdx.x / PR;
            const __nv_bfloat16* from = s + cv * 8 + row0 * row_stride;
            uint4 r[NV];
#pragma unroll
            for (int i = 0; i < NV; ++i)
                r[i] = row0 + i * RS < valid ? *reinterpret_cast<const uint4*>(from + i * RS * row_stride) : make_uint4(0, 0, 0, 0);
            const int h0 = (cv >> 2) & 1;
#pragma unroll
            for (int i = 0; i < NV; ++i) {
                // the piece's words in store order: the half stored at d + 4·h0 first (the second half
                // where h0), picked before the conversion: 4 selects a piece instead of 8
                const uint32_t w[4] = {h0 ? r[i].z : r[i].x, h0 ? r[i].w : r[i].y, h0 ? r[i].x : r[i].z,
                                       h0 ? r[i].y : r[i].w};
                float f[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = unpack_elem<__nv_bfloat16>(w, j);
                float* d = dst + (row0 + i * RS) * ld + cv * 8;
                *reinterpret_cast<float4*>(d + 4 * h0) = make_float4(f[0], f[1], f[2], f[3]);
                *reinterpret_cast<float4*>(d + 4 - 4 * h0) = make_float4(f[4], f[5], f[6], f[7]);
            }
            return;
        }
    }
    load_rows_any<kChunk, COLS, THREADS>(dst, ld, src, dtype, offset, row_stride, valid);
}

// γ_C = e^{R_0 + tot} into *gC, tot = S_0 + … + S_3 = b_C − b_0 the chunk's log decay in one channel;
// kSlowChunk when it spans more than e^kFastSpan (the single-reference path's bound), else 0.
__device__ __forceinline__ int chunk_decay_total(float R0, float tot, float* gC) {
    *gC = __expf(R0 + tot);
    return tot < -kFastSpan ? kSlowChunk : 0;
}

// One channel's in-chunk sums of vector decay (the numerics at the top): Δ_i = b_i − R_I into column c
// of Fs (each block's first row 0), R_0 into St[c] and the block sums S_I into St[(I + 1)·K + c], γ_C =
// e^{b_C} into *gC. gate(i) is token i's log decay (0 past the sequence's end). Returns the chunk's
// bits for `wide`. Δ_i is the sum of the block's gates after its first, so the four blocks are four
// independent sums (four chains in flight instead of one of 64); R_0 is the first gate and S_I =
// R_{I+1} − R_I the block's sum after its first plus the next block's first. Compensated fp32 sums
// (compensated_add): Δ_i − Δ_j as exact as with fp64 sums, whose conversions each way on every element
// took ~20% of KDA prepare's stall samples (ncu, B=4 T=4096, session 12). kUnroll (gate() a plain
// load): five rows at a time, twenty loads in flight at once (rolled, each row's loads waited out
// their latency in turn, with a branch on the activation per element: with this and the other
// changes marked session 15 in this file but the inverse's, KDA prepare 291 → 259 µs). Rolled otherwise: fully unrolled, the
// 64 inlined copies of the gate activation grew the KDA kernel (K = 128) from 260 to 387 KiB of
// machine code, and KDA B=4 T=4096 ran 1.08 ms (0.74 ms rolled, H100, session 5).
template <bool kUnroll, class Gate>
__device__ __forceinline__ int channel_decay_sums(const Gate& gate, float* Fs, int ldf, float* St, int K, int c,
                                                  float* gC) {
    float first[4], sum[4] = {0.f, 0.f, 0.f, 0.f}, lo[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int I = 0; I < 4; ++I) {
        first[I] = gate(16 * I);
        Fs[16 * I * ldf + c] = 0.f;
    }
    auto row = [&](int ii) {
        float x[4];
#pragma unroll
        for (int I = 0; I < 4; ++I) x[I] = gate(16 * I + ii);
#pragma unroll
        for (int I = 0; I < 4; ++I) {
            compensated_add(sum[I], lo[I], x[I]);
            Fs[(16 * I + ii) * ldf + c] = sum[I] + lo[I];
        }
    };
    if constexpr (kUnroll) {
#pragma unroll 5
        for (int ii = 1; ii < 16; ++ii) row(ii);
    } else {
#pragma unroll 1
        for (int ii = 1; ii < 16; ++ii) row(ii);
    }
    int flags = 0;
    float S[4], tot = 0.f;
#pragma unroll
    for (int I = 0; I < 4; ++I) {
        sum[I] += lo[I];
        S[I] = sum[I] + (I < 3 ? first[I + 1] : 0.f);
        tot += S[I];
        if (sum[I] < -kSafeSpan) flags |= 1 << I;
    }
    St[c] = first[0];
#pragma unroll
    for (int I = 0; I < 4; ++I) St[(I + 1) * K + c] = S[I];
    return flags | chunk_decay_total(first[0], tot, gC);
}

// The in-chunk sums of vector decay (the numerics at the top) on tensor cores, for bf16 gates without
// an activation, one row block a warp: block I = warp is Δ = M G_I with G_I its 16 raw gate rows (bf16,
// exact as mma operands) and M[i][j] = 1 for 1 ≤ j ≤ i (Δ_i = g_{r_I + 1} + … + g_{r_I + i}, Δ of the
// block's first row 0), one m16n8k16 a column tile. Every product is exact and the tensor cores sum
// them in fp32, so Δ is within a few ulps of the exact sum instead of within half of one
// (channel_decay_sums' compensated sums): far below the bf16 rounding of the operands it decays while
// the chunk's span is at most kFastSpan; chunks that span more are summed again exactly by
// channel_decay_sums (the factored path's differences need it). gr: the warp's gate rows [16][ldg] (rows
// past the sequence's end zero), in the upper half of its Δ rows in Fs [64][ldf], which it overwrites
// once it has read them. The block's first gates g_{r_I} go to St[I·K + c]; decay_sums_finish turns
// them and Δ's last rows into R_0 and the S_I once every warp is done. No block barrier: a warp needs
// only its own rows (one across the block here, waiting for the slowest warp's rows, had been ~3% of
// KDA prepare's stall samples).
template <int K>
__device__ __forceinline__ void decay_sums_mma(const __nv_bfloat16* gr, int ldg, float* Fs, int ldf, float* St) {
    using E = __nv_bfloat16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, mi = lane >> 3, r8 = lane & 7;
    // M's A fragment: register e holds row g + 8(e & 1), columns 2t + 8(e >> 1) and the next
    uint32_t m[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e & 1), col = 2 * t + 8 * (e >> 1);
        m[e] = (col >= 1 && col <= row ? 0x3F80u : 0u) | (col + 1 <= row ? 0x3F800000u : 0u);  // bf16 1.0 in each half
    }
    float acc[1][K / 8][4];
    zero_acc(acc);
#pragma unroll
    for (int np = 0; np < K / 16; ++np) {
        uint32_t x[4];
        ldmatrix_x4_trans(x, gr + ((mi & 1) * 8 + r8) * ldg + 16 * np + (mi >> 1) * 8);
        const uint32_t b0[2] = {x[0], x[1]}, b1[2] = {x[2], x[3]};
        mma16(acc[0][2 * np], m, b0, E());
        mma16(acc[0][2 * np + 1], m, b1, E());
    }
#pragma unroll
    for (int c = lane; c < K; c += 32) St[warp * K + c] = __bfloat162float(gr[c]);
    __syncwarp();  // the warp has read its gate rows: Δ may take their bytes
    store_acc<float>(acc, Fs + 16 * warp * ldf, ldf);
}

// After decay_sums_mma in every warp and a block barrier, channel c's R_0 = g_0 stays in St[c] and the
// block sums S_I = Δ_{r_I + 15} + g_{r_{I+1}} (0 after the last block) take St[(I + 1)·K + c] (where
// g_{r_{I+1}} was); γ_C and the slow flag as chunk_decay_total.
template <int K>
__device__ __forceinline__ int decay_sums_finish(const float* Fs, int ldf, float* St, int c, float* gC) {
    float tot = 0.f;
#pragma unroll
    for (int I = 0; I < 4; ++I) {
        const float sI = Fs[(16 * I + 15) * ldf + c] + (I < 3 ? St[(I + 1) * K + c] : 0.f);
        St[(I + 1) * K + c] = sI;
        tot += sI;
    }
    return chunk_decay_total(St[c], tot, gC);
}

// One (chunk, value head) of chunk_prepare_mma_kernel (below).
template <Decay D, Update Up, int K>
__device__ __forceinline__ void prepare_chunk_mma(const FwdParams& p, const int chunk, const int hv) {
    using E = __nv_bfloat16;
    using L = PrepMmaLayout<D, Up, K>;
    constexpr bool kVec = L::kVec, kDelta = L::kDelta;
    constexpr int LDH = L::LDH, LDV = L::LDV, LDF = L::LDF, LDA = L::LDA;
    extern __shared__ float4 smem_f4[];
    char* sm = reinterpret_cast<char*>(smem_f4);
    E* qs = reinterpret_cast<E*>(sm + L::q_off);  // raw q; for the delta rule K⊙γ (normalised) once the scores are done
    E* ks = reinterpret_cast<E*>(sm + L::k_off);
    E* vs = ks;  // v [64][LDV] once k is dead (delta rule)
    float* Fs = reinterpret_cast<float*>(sm + L::f_off);  // Δ [64][LDF]
    // A [64][LDA], strictly lower, β_i and norms applied; L = (I + A)^{-1} [64][LDL]; K⊙γ [64][LDG].
    // Vector decay: A in q's bytes, L and K⊙γ in Δ's rows (row i in row i's bytes, see the layout).
    float* As = kVec ? reinterpret_cast<float*>(sm + L::q_off) : Fs;
    float* Ls = kVec ? Fs : Fs + kChunk * LDA;
    constexpr int LDL = kVec ? LDF : LDA;
    E* kgs = kVec ? reinterpret_cast<E*>(Fs) + L::KG_OFF : qs;
    constexpr int LDG = kVec ? 2 * LDF : LDH;
    // vector decay: R_0 at St[c], S_I at St[(I + 1)·K + c]. Every exponent needed is a sum of these of
    // one sign (g ≤ 0), so it stays accurate however large the sums: R_I − R_J = S_J + … + S_{I−1},
    // b_C − R_I = S_I + … + S_3, R_I = R_0 + S_0 + … + S_{I−1}.
    float* St = reinterpret_cast<float*>(sm + L::t_off);
    // scalar decays: b_i as an fp32 pair hi + lo (hi: b_i rounded to fp32; lo: what that dropped,
    // rounded). (hi_i − hi_j) + (lo_i − lo_j) is b_i − b_j to about an ulp of the difference itself,
    // however deep both are (the design's "decay without cancellation"), as the fp64 difference rounded
    // to fp32 was, without fp64 arithmetic and a conversion per score (session 15: with those, the
    // scores' decay was ~17% of GDN prepare's stall samples, branches around each exp included)
    float2* bhl = reinterpret_cast<float2*>(sm + L::t_off);
    float* betas = reinterpret_cast<float*>(sm + L::r_off);
    float* rq = betas + kChunk;  // s / ‖q_i‖ (or s)
    float* rk = rq + kChunk;     // 1 / ‖k_i‖ (or 1)
    float* eq = rk + kChunk;     // e^{b_i}          (scalar decays)
    float* ek = eq + kChunk;     // e^{b_C − b_i}    (scalar decays)
    float* qkd = ek + kChunk;    // q_i·k_i of the raw inputs in fp32 (vector decay: the exact diagonal of P)
    // vector decay: bit I: row block I spans more than e^80; kSlowChunk: the chunk more than e^kFastSpan
    int* wide = reinterpret_cast<int*>(qkd + kChunk);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = hv / p.G;
    const ChunkInfo ci = p.chunks[chunk];
    const int len = ci.len;
    const int r0 = 16 * warp;
    const size_t slot = size_t(chunk) * p.HV + hv;
    const int V = p.V;

    if (tid == 0) *wide = 0;
    // ---- one decay number per token (warp 0, two tokens a lane) and β (threads 64..127): the inputs
    // before the copies below, which they would queue behind (the block waits for warp 0's sums) ----
    float in[2] = {0.f, 0.f};
    if constexpr (kDelta) {
        if (tid >= kChunk && tid - kChunk < len)
            in[0] = load_any(p.beta, p.beta_dtype, ci.batch * p.bs[0] + (ci.start + int64_t(tid - kChunk)) * p.bs[1] + hv * p.bs[2]);
    }
    if constexpr (!kVec) {
        if (warp == 0) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = 2 * lane + e;
                if (i >= len) continue;
                if constexpr (D == Decay::Scalar)
                    in[e] = load_any(p.g, p.g_dtype, ci.batch * p.gs[0] + (ci.start + int64_t(i)) * p.gs[1] + hv * p.gs[2]);
                else if constexpr (D == Decay::Fixed)
                    in[e] = static_cast<const float*>(p.g)[hv];
            }
        }
    }
    // ---- vector decay: the gate rows (bf16 without an activation: by the copy engine, for the
    // tensor-core sums, ahead of q and k), q, k (and v) → shared memory, asynchronously ----
    const bool gates_mma = kVec && p.g_dtype == DType::BF16 && p.gate_act == GateActivation::None;  // block-uniform
    const int64_t goff = ci.batch * p.gs[0] + int64_t(ci.start) * p.gs[1] + hv * p.gs[2];
    E* const gate_rows = reinterpret_cast<E*>(sm + L::g_off(warp));  // this warp's row block's (gates_mma)
    if (gates_mma) {
        stage_rows<K, 32, E, 16>(gate_rows, LDH, static_cast<const E*>(p.g) + goff, p.gs[1], len, 16 * warp, lane);
        cp_async_commit();
    }
    const E* qsrc = static_cast<const E*>(p.q) + ci.batch * p.qs[0] + int64_t(ci.start) * p.qs[1] + h * p.qs[2];
    const E* ksrc = static_cast<const E*>(p.k) + ci.batch * p.ks[0] + int64_t(ci.start) * p.ks[1] + h * p.ks[2];
    const E* vsrc = static_cast<const E*>(p.v) + ci.batch * p.vs[0] + int64_t(ci.start) * p.vs[1] + hv * p.vs[2];
    stage_rows<K, kPrepMmaThreads>(qs, LDH, qsrc, p.qs[1], len);
    stage_rows<K, kPrepMmaThreads>(ks, LDH, ksrc, p.ks[1], len);
    cp_async_commit();

    // ---- gates and β (overlapping the copies) ----
    if constexpr (kDelta) {
        if (tid >= kChunk) betas[tid - kChunk] = tid - kChunk < len ? beta_value(p.beta_act, in[0]) : 0.f;
    }
    if constexpr (kVec) {
        // other gates: raw gate rows as fp32 into Δ's rows, one round trip of 16-byte loads (read by
        // each channel's thread straight from memory instead, 64 two-byte loads of which twenty were in
        // flight at a time, KDA prepare took 334 µs instead of 290; session 15); the activation and
        // the sums follow once they are in
        if (!gates_mma) stage_gate_rows<K, kPrepMmaThreads>(Fs, LDF, p.g, p.g_dtype, goff, p.gs[1], len);
    } else if (warp == 0) {
        // one decay number per token: two tokens per lane, summed in fp64 (warp_chunk_log_decay)
        double a[2] = {0.0, 0.0};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int i = 2 * lane + e;
            if (i >= len) continue;
            if constexpr (D == Decay::Scalar) {
                const float x = in[e];
                a[e] = p.gate_act == GateActivation::None
                           ? x
                           : gate_log_decay(p.gate_act, p.lower_bound, x + static_cast<const float*>(p.dt_bias)[hv],
                                            static_cast<const float*>(p.A_log)[hv]);
            } else if constexpr (D == Decay::Fixed) {
                a[e] = in[e];
            }
        }
        const auto [b0, b1, bC] = warp_chunk_log_decay(a[0], a[1], lane);
        const float h0 = float(b0), h1 = float(b1);
        bhl[2 * lane] = make_float2(h0, float(b0 - double(h0)));
        bhl[2 * lane + 1] = make_float2(h1, float(b1 - double(h1)));
        eq[2 * lane] = __expf(float(b0));
        eq[2 * lane + 1] = __expf(float(b1));
        ek[2 * lane] = __expf(float(bC - b0));
        ek[2 * lane + 1] = __expf(float(bC - b1));
        for (int c = lane; c < K; c += 32) p.gC[slot * K + c] = __expf(float(bC));
    }
    // ---- vector decay, bf16 gates without an activation: the in-chunk sums on tensor cores while q
    // and k land (session 17: the fp32 staging through registers and the per-channel sums of the other
    // gates were ~24% of KDA prepare's stall samples) ----
    if (gates_mma) {
        cp_async_wait_group<1>();  // the warp's gate rows (q and k may still be in flight)
        __syncwarp();
        decay_sums_mma<K>(gate_rows, LDH, Fs, LDF, St);
    }
    cp_async_wait_all();
    __syncthreads();

    // ---- vector decay, per channel (one thread each): the activation and the in-chunk sums, exact
    // (compensated); after the tensor-core sums, only γ_C and whether the chunk spans more than
    // e^kFastSpan (then the exact sums follow below) ----
    auto exact_decay_sums = [&] {
        if (tid < K) {
            const int c = tid;
            int flags;
            float* gC = p.gC + slot * K + c;
            if (p.gate_act == GateActivation::None) {
                // rows ≥ len are 0: the copy zero-filled them
                flags = channel_decay_sums<true>([&](int i) { return Fs[i * LDF + c]; }, Fs, LDF, St, K, c, gC);
            } else {
                // the fast activation (common.cuh), chosen once, in the rolled sums (session 18: the
                // full-precision activation took KDA's forward at B=1 T=16384 from 0.50 to 0.89 ms; with
                // the fast one unrolled five rows deep, 0.73, and plain bf16 KDA there 0.50 → 0.63, the
                // machine code presumably: its concurrent prepare shares the SMs with the scan)
                const float dtb = static_cast<const float*>(p.dt_bias)[hv * K + c];
                flags = with_fast_gate(p.gate_act, static_cast<const float*>(p.A_log)[hv], p.lower_bound, [&](const auto& act) {
                    auto gate = [&](int i) -> float {
                        // every row's activation, then a select: no branch in the loop (rows ≥ len hold
                        // the staging's zeros, so their activation is finite and discarded)
                        const float a = act(Fs[i * LDF + c] + dtb);
                        return i < len ? a : 0.f;
                    };
                    return channel_decay_sums<false>(gate, Fs, LDF, St, K, c, gC);
                });
            }
            if (flags) atomicOr(wide, flags);
        }
    };
    if constexpr (kVec) {
        if (!gates_mma) {
            exact_decay_sums();
        } else if (tid < K) {
            if (const int slow = decay_sums_finish<K>(Fs, LDF, St, tid, p.gC + slot * K + tid)) atomicOr(wide, slow);
        }
    }
    // ---- L2 norms (and the scale) of the chunk's rows; vector decay: q_i·k_i. Two lanes a row, each
    // summing half of it in 16-byte pieces (at K = 128 the second half's pieces start four pieces
    // later, so that the two lanes of a row read different banks; at K = 64 they do already), then one
    // shuffle. One warp a row with five shuffle steps made the rows' shuffle chains ~22% of GDN
    // prepare's stall samples (ncu, B=4 T=4096). ----
    {
        static_assert(kPrepMmaThreads == 2 * kChunk, "prepare: two lanes a row for the norms");
        constexpr int PH = K / 16;  // 16-byte pieces of half a row
        const int i = tid >> 1, half = tid & 1;
        const E* qrow = qs + i * LDH + half * (K / 2);
        const E* krow = ks + i * LDH + half * (K / 2);
        float sq = 0.f, sk = 0.f, sqk = 0.f;
#pragma unroll
        for (int j = 0; j < PH; ++j) {
            const int c = ((j + 4 * half) % PH) * 8;
            add_piece_squares<kVec>(*reinterpret_cast<const uint4*>(qrow + c), *reinterpret_cast<const uint4*>(krow + c), sq,
                                    sk, sqk);
        }
        if constexpr (kVec) sqk = lane_group_sum<2>(sqk);
        const float2 f = qk_row_factors_of_sums(lane_group_sum<2>(sq), lane_group_sum<2>(sk), p.scale, p.qk_l2norm);
        if (half == 0) {
            rq[i] = f.x;
            rk[i] = f.y;
            if constexpr (kVec) qkd[i] = sqk;
        }
    }
    __syncthreads();
    if constexpr (kVec) {
        if (gates_mma && (*wide & kSlowChunk)) {
            // the factored path (chunks spanning more than e^kFastSpan, rare) takes its differences of
            // nearby sums from the exact ones: the gate rows again, as fp32 into Δ's rows
            stage_gate_rows<K, kPrepMmaThreads>(Fs, LDF, p.g, p.g_dtype, goff, p.gs[1], len);
            cp_async_wait_all();
            __syncthreads();
            exact_decay_sums();
            __syncthreads();
        }
    }
    if constexpr (!kVec) {
        // the scan's row factors when it reads q and k raw (eq = ek = 1 without decay)
        if (p.qk_rowf && tid < kChunk) {
            float* rf = p.qk_rowf + slot * kRowFactorRows * kChunk;
            rf[kRowFq * kChunk + tid] = rq[tid] * eq[tid];
            rf[kRowFk * kChunk + tid] = tid < len ? rk[tid] * ek[tid] : 0.f;
            if (p.Tw) rf[kRowPhi * kChunk + tid] = tid < len ? rk[tid] * eq[tid] : 0.f;  // φ: the scan's K⊙γ
        }
    }

    // ---- scores of this warp's rows: P (j ≤ i) and A (j < i), 64 columns, fp32 accumulators ----
    float accP[1][8][4], accA[1][8][4];
    zero_acc(accP);
    zero_acc(accA);
    bool fast = false;  // vector decay: the single-reference path (block-uniform)
    // the single-reference path's blocks (its products below): block b of this warp is (I, J) =
    // fast_block(b), b < fast_blocks(); blkP[b], blkA[b] its accumulators. Functions of warp, evaluated
    // where used: as values kept from here to A's store they made the concurrent KDA kernel spill.
    auto fast_block = [&](int b) {
        const bool quarter = warp < 2;
        const int I = quarter ? 2 * warp : warp, J = quarter ? 2 * warp : 0;
        return b == 0 ? make_int2(I, J) : (b == 2 ? make_int2(I + 1, J + 1) : (quarter ? make_int2(I + 1, J) : make_int2(I, J + 1)));
    };
    auto fast_blocks = [&] { return warp < 2 ? 3 : 2; };
    float blkP[3][1][2][4], blkA[3][1][2][4];
#pragma unroll
    for (int b = 0; b < 3; ++b) {
        zero_acc(blkP[b]);
        zero_acc(blkA[b]);
    }
    if constexpr (!kVec) {
        const Tile<E> Bk{ks, 1, LDH};  // B(channel, token j) = k_j
        warp_gemm<E, 1, 8>(accP, Tile<E>{qs + r0 * LDH, LDH, 1}, Bk, K);
        if constexpr (kDelta) warp_gemm<E, 1, 8>(accA, Tile<E>{ks + r0 * LDH, LDH, 1}, Bk, K);
    } else {
        fast = !(*wide & kSlowChunk);
    }
    if (kVec && fast) {
        // ---- this warp's rows, 8 channels per lane: qa → q's bytes, kb → k's bytes, ka and K⊙γ → the
        // row's own Δ bytes; Qg = sq̂ ⊙ γ and Kd = k̂ ⊙ γ_C ⊘ γ to memory ----
        constexpr int LPR = K / 8, RPI = 32 / LPR;
        constexpr float kLog2e = 1.4426950408889634f;
        const int c0 = 8 * (lane % LPR);
        E* Qg = p.Qg ? static_cast<E*>(p.Qg) + slot * kChunk * K : nullptr;
        E* Kd = p.Kd ? static_cast<E*>(p.Kd) + slot * kChunk * K : nullptr;
        E* Kg = p.Kg ? static_cast<E*>(p.Kg) + slot * kChunk * K : nullptr;  // the scan forms W from it
        E* kas = reinterpret_cast<E*>(Fs);  // ka [64][2·LDF]
        // Every factor from the two exponentials e^{b_i − m} and e^{m − b_i} of each element and
        // per-channel constants: ca = R_I − m in log2 units (m = b_0 + (b_C − b_0)/2), ec = e^{b_C − m} ∈
        // [e^{−kFastSpan/2}, 1] and em = e^{m + kFastSpan/2} ≤ e^{kFastSpan/2}, so that
        //   e^{b_C − b_i} = e^{m − b_i} · ec,   e^{b_i} = e^{b_i − m} · em · e^{−kFastSpan/2},
        // the last factor on the row's norm. Every intermediate stays within e^{±kFastSpan/2} of the raw
        // value, so nothing overflows; e^{b_i} below e^{−87} ends as zero or subnormal, as the direct
        // exponential's did (flushed). Two exponentials an element instead of four, and ~15 other
        // operations instead of ~20 (session 16).
        constexpr float kUnscale = 8.7565107626965203e-27f;  // e^{−kFastSpan/2}
        static_assert(kFastSpan == 120.f, "prepare: kUnscale is e^{-kFastSpan/2}");
        float ca[8], ec[8], em[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float pre = 0.f, post = 0.f;
#pragma unroll
            for (int I = 0; I < 4; ++I) {
                const float s = St[(I + 1) * K + c0 + e];
                if (I < warp) pre += s;
                else post += s;
            }
            const float half_span = 0.5f * (pre + post);  // (b_C − b_0)/2 = b_C − m
            ca[e] = (pre - half_span) * kLog2e;
            ec[e] = exp2_approx(half_span * kLog2e);
            em[e] = exp2_approx((St[c0 + e] + half_span + 0.5f * kFastSpan) * kLog2e);
        }
        for (int it = 0; it < 16 / RPI; ++it) {
            const int i = r0 + it * RPI + lane / LPR;
            const uint4 qraw = *reinterpret_cast<const uint4*>(qs + i * LDH + c0);
            const uint4 kraw = *reinterpret_cast<const uint4*>(ks + i * LDH + c0);
            const float4 d0 = *reinterpret_cast<const float4*>(Fs + i * LDF + c0);
            const float4 d1 = *reinterpret_cast<const float4*>(Fs + i * LDF + c0 + 4);
            __syncwarp();  // the row's Δ is read by all its lanes before ka and K⊙γ take its bytes
            const uint32_t qw[4] = {qraw.x, qraw.y, qraw.z, qraw.w}, kw[4] = {kraw.x, kraw.y, kraw.z, kraw.w};
            const float d[8] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
            const float rki = rk[i], rqs = rq[i] * kUnscale, rks = rki * kUnscale;
            float qa[8], ka[8], kb[8], qo[8], ko[8], kg[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float xa = fmaf(d[e], kLog2e, ca[e]);
                const float ea = exp2_approx(xa), eab = exp2_approx(-xa);  // e^{b_i − m}, e^{m − b_i}
                const float qe = unpack_elem<E>(qw, e), kr = unpack_elem<E>(kw, e);
                qa[e] = qe * ea;
                ka[e] = kr * ea;
                kb[e] = kr * eab;
                qo[e] = qa[e] * em[e] * rqs;  // s q̂ e^{b_i}
                ko[e] = kb[e] * rki * ec[e];  // k̂ e^{b_C − b_i}
                kg[e] = ka[e] * em[e] * rks;  // k̂ e^{b_i}
            }
            store_vec<E>(qs + i * LDH + c0, qa);
            store_vec<E>(ks + i * LDH + c0, kb);
            if (Qg) {
                store_vec<E>(Qg + i * K + c0, qo);
                store_vec<E>(Kd + i * K + c0, ko);
            }
            if constexpr (kDelta) {
                store_vec<E>(kas + i * (2 * LDF) + c0, ka);
                if (Kg) store_vec<E>(Kg + i * K + c0, kg);  // for the scan's W; else W's product below reads it here
                else store_vec<E>(kgs + i * LDG + c0, kg);
            }
        }
        __syncthreads();  // qa, ka and kb of every row (warps 0 and 1 read two row blocks, and every warp others' kb)
        // ---- P = qa kbᵀ, A = ka kbᵀ: the ten 16×16 blocks on and below the diagonal, 3/3/2/2 a warp
        // (as warp w's row block, warp w computed w + 1 of them and three warps waited for warp 3).
        // Warps 0 and 1: their diagonal quarter's three, (2w, 2w), (2w + 1, 2w), (2w + 1, 2w + 1);
        // warps 2 and 3: their row block of the lower-left quarter, (w, 0) and (w, 1). ----
        const int mi = lane >> 3, r8 = lane & 7;
        const bool quarter = warp < 2;
        const int fast_I = fast_block(0).x, fast_J = fast_block(0).y;
#pragma unroll 2
        for (int k0 = 0; k0 < K; k0 += 16) {
            uint32_t aq[2][4], ak[2][4], x[2][4];
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const int row = 16 * (fast_I + s) + (mi & 1) * 8 + r8;
                if (s == 0 || quarter) {
                    ldmatrix_x4(aq[s], qs + row * LDH + k0 + (mi >> 1) * 8);
                    if constexpr (kDelta) ldmatrix_x4(ak[s], kas + row * (2 * LDF) + k0 + (mi >> 1) * 8);
                }
                ldmatrix_x4(x[s], ks + (16 * (fast_J + s) + (mi >> 1) * 8 + r8) * LDH + k0 + (mi & 1) * 8);
            }
            auto block = [&](int b, int s, int u) {  // block b from row block fast_I + s, column block fast_J + u
                const uint32_t b0[2] = {x[u][0], x[u][1]}, b1[2] = {x[u][2], x[u][3]};
                mma16(blkP[b][0][0], aq[s], b0, E());
                mma16(blkP[b][0][1], aq[s], b1, E());
                if constexpr (kDelta) {
                    mma16(blkA[b][0][0], ak[s], b0, E());
                    mma16(blkA[b][0][1], ak[s], b1, E());
                }
            };
            block(0, 0, 0);
            if (quarter) {
                block(1, 1, 0);
                block(2, 1, 1);
            } else {
                block(1, 0, 1);
            }
        }
    } else if constexpr (kVec) {
        const bool wide_diag = (*wide >> warp) & 1;
        for (int kk = 0; kk < K; kk += 16) {
            // A fragments: rows r0 + g (+8), channels kk + 2t (+8): q e^{Δ_i}, k e^{Δ_i}
            uint32_t aq[4], ak[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = r0 + g + 8 * (e & 1), c = kk + 2 * t + 8 * (e >> 1);
                const float2 d = *reinterpret_cast<const float2*>(Fs + i * LDF + c);
                const float f0 = __expf(d.x), f1 = __expf(d.y);
                const float2 qv = load_pair(qs + i * LDH + c);
                aq[e] = pack_bf16(qv.x * f0, qv.y * f1);
                if constexpr (kDelta) {
                    const float2 kv = load_pair(ks + i * LDH + c);
                    ak[e] = pack_bf16(kv.x * f0, kv.y * f1);
                }
            }
            // column blocks J = warp, warp − 1, …, 0, carrying off = R_warp − R_J = S_J + … + S_{warp−1}
            float2 off[2] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
#pragma unroll
            for (int J = 3; J >= 0; --J) {
                if (J > warp) continue;  // warp-uniform
                if (J < warp)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const float2 sj = *reinterpret_cast<const float2*>(St + (J + 1) * K + kk + 2 * t + 8 * hh);
                        off[hh].x += sj.x;
                        off[hh].y += sj.y;
                    }
                if (J == warp && wide_diag) continue;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    // B fragment: channels kk + 2t (+8), token j = 8nt + g: k_j e^{(R_I − R_J) − Δ_j}
                    const int nt = 2 * J + half, j = 8 * nt + g;
                    uint32_t b[2];
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int c = kk + 2 * t + 8 * hh;
                        const float2 d = *reinterpret_cast<const float2*>(Fs + j * LDF + c);
                        const float2 kv = load_pair(ks + j * LDH + c);
                        b[hh] = pack_bf16(kv.x * __expf(off[hh].x - d.x), kv.y * __expf(off[hh].y - d.y));
                    }
                    mma16(accP[0][nt], aq, b, E());
                    if constexpr (kDelta) mma16(accA[0][nt], ak, b, E());
                }
            }
        }
        if (wide_diag) {
            // the diagonal block entry by entry: Σ_c x_ic k_jc e^{Δ_ic − Δ_jc}, every factor ≤ 1
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                if ((nt >> 1) != warp) continue;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = r0 + g + 8 * (e >> 1), j = 8 * nt + 2 * t + (e & 1);
                    if (j > i) continue;
                    float sp = 0.f, sa = 0.f;
                    for (int c = 0; c < K; ++c) {
                        const float kj = __bfloat162float(ks[j * LDH + c]) * __expf(Fs[i * LDF + c] - Fs[j * LDF + c]);
                        sp += __bfloat162float(qs[i * LDH + c]) * kj;
                        sa += __bfloat162float(ks[i * LDH + c]) * kj;
                    }
                    accP[0][nt][e] += sp;
                    accA[0][nt][e] += sa;
                }
            }
        }
    }
    // norms, β and (one number per token) the decay on the fp32 results; the causal masks. Vector
    // decay: P's diagonal is q_i·k_i (e^{b_i − b_i} = 1), taken from the raw inputs instead of the
    // product of two rounded decayed operands (the reference run in bf16 rounds neither: it rounds
    // the state and the output). The diagonal is the largest entry of a row when the decay is strong,
    // and those two roundings were a large share of the bf16 forward's error: KDA's bf16 test o ran
    // at 0.93-1.00x its bound with the factored scores and 1.00-1.06x with the single-reference ones;
    // 0.80-0.89x with this (GLA 0.87-0.92x -> 0.69-0.73x)
    // The lane's two rows (g, g + 8 of a row block) and each column pair's factors are read once
    // (session 15; read per element, with the Dm test per element, this loop was ~7% of KDA prepare's
    // instructions); the products keep their order.
    {
        constexpr bool kScalarDecay = D == Decay::Scalar || D == Decay::Fixed;
        struct RowFactors {
            float rq[2], rk[2], beta[2];
            float2 b[2];
        };
        auto row_factors = [&](int I) {  // the lane's two rows of row block I
            RowFactors f;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int i = 16 * I + g + 8 * h;
                f.rq[h] = rq[i];
                f.rk[h] = rk[i];
                f.beta[h] = kDelta ? betas[i] : 0.f;
                f.b[h] = kScalarDecay ? bhl[i] : make_float2(0.f, 0.f);
            }
            return f;
        };
        E* Pg = static_cast<E*>(p.P) + slot * kChunk * kChunk;
        // the backward's decayed key products, before β and the causal mask's zeros
        float* Dg = kVec && kDelta && p.Dm ? p.Dm + slot * kChunk * kChunk : nullptr;
        // the n8 tile nt (columns 8nt ..) of row block I, from its P and A products tp, ta
        auto finish_tile = [&](float (&tp)[4], float (&ta)[4], int I, int nt, const RowFactors& f) {
            static_assert(L::r_off % 16 == 0, "prepare: the row factors' pairs are 8-byte loads");
            const float2 rk_j = *reinterpret_cast<const float2*>(rk + 8 * nt + 2 * t);
            static_assert(L::t_off % 16 == 0, "prepare: a column pair's b is one 16-byte load");
            const float4 b_j = kScalarDecay ? *reinterpret_cast<const float4*>(bhl + 8 * nt + 2 * t) : float4{};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e >> 1, i = 16 * I + g + 8 * h, j = 8 * nt + 2 * t + (e & 1);
                const float rkj = (e & 1) ? rk_j.y : rk_j.x;
                if constexpr (kVec && kDelta)
                    if (Dg) Dg[i * kChunk + j] = j < i ? ta[e] * f.rk[h] * rkj : 0.f;
                if constexpr (kVec)
                    if ((nt >> 1) == I && j == i) tp[e] = qkd[i];
                // e^{b_i − b_j}, for every pair: where j > i it may overflow, and the selects below drop it
                float dec = 1.f;
                if constexpr (kScalarDecay)
                    dec = __expf((e & 1) ? (f.b[h].x - b_j.z) + (f.b[h].y - b_j.w) : (f.b[h].x - b_j.x) + (f.b[h].y - b_j.y));
                tp[e] = j <= i ? tp[e] * f.rq[h] * rkj * dec : 0.f;
                if constexpr (kDelta) ta[e] = j < i ? ta[e] * f.beta[h] * f.rk[h] * rkj * dec : 0.f;
            }
        };
        if (kVec && fast) {
#pragma unroll
            for (int b = 0; b < 3; ++b) {
                if (b >= fast_blocks()) break;
                const int2 IJ = fast_block(b);
                const RowFactors f = row_factors(IJ.x);
                finish_tile(blkP[b][0][0], blkA[b][0][0], IJ.x, 2 * IJ.y, f);
                finish_tile(blkP[b][0][1], blkA[b][0][1], IJ.x, 2 * IJ.y + 1, f);
                store_acc<E>(blkP[b], Pg + 16 * IJ.x * kChunk + 16 * IJ.y, kChunk);
            }
            // the six blocks above the diagonal are zeros, 1/1/2/2 a warp: warps 0 and 1 (2w, 2w + 1),
            // warps 2 and 3 (w − 2, 2) and (w − 2, 3); 8 elements a lane
#pragma unroll
            for (int z = 0; z < 2; ++z) {
                if (z == 1 && warp < 2) break;
                const int I = warp < 2 ? 2 * warp : warp - 2, J = warp < 2 ? 2 * warp + 1 : 2 + z;
                const int at = (16 * I + (lane >> 1)) * kChunk + 16 * J + 8 * (lane & 1);
                *reinterpret_cast<uint4*>(Pg + at) = make_uint4(0, 0, 0, 0);
                if (Dg) {
                    *reinterpret_cast<float4*>(Dg + at) = make_float4(0.f, 0.f, 0.f, 0.f);
                    *reinterpret_cast<float4*>(Dg + at + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
                }
            }
        } else {
            const RowFactors f = row_factors(warp);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) finish_tile(accP[0][nt], accA[0][nt], warp, nt, f);
            store_acc<E>(accP, Pg + r0 * kChunk, kChunk);
        }
    }
    // other decays: every lane's reads of q rows r0.. are done before K⊙γ overwrites them; vector
    // decay (delta rule): every warp's reads of Δ are, before K⊙γ takes half of each Δ row
    if (kVec && kDelta && !fast) __syncthreads();
    else __syncwarp();

    // ---- Qg = sq̂ ⊙ γ, Kd = k̂ ⊙ γ_C ⊘ γ (and K⊙γ for W) for this warp's rows, 8 channels per lane;
    // the vector decay's single-reference path formed them with its operands; none of them with raw
    // operands and Tw (the scan forms W) ----
    if (!(kVec && fast) && !(p.Tw && p.qk_rowf)) {
        constexpr int LPR = K / 8, RPI = 32 / LPR;
        E* Qg = p.Qg ? static_cast<E*>(p.Qg) + slot * kChunk * K : nullptr;
        E* Kd = p.Kd ? static_cast<E*>(p.Kd) + slot * kChunk * K : nullptr;
        E* Kg = p.Kg ? static_cast<E*>(p.Kg) + slot * kChunk * K : nullptr;  // the scan forms W from it
        // vector decay: this block's R_I and b_C − R_I for the lane's 8 channels
        float Rb[8], Eb[8];
        if constexpr (kVec) {
            const int c0 = 8 * (lane % LPR);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float r = St[c0 + e], x = 0.f;
                for (int I = 0; I < 4; ++I) {
                    const float s = St[(I + 1) * K + c0 + e];
                    if (I < warp) r += s;
                    else x += s;
                }
                Rb[e] = r;
                Eb[e] = x;
            }
        }
        for (int it = 0; it < 16 / RPI; ++it) {
            const int i = r0 + it * RPI + lane / LPR, c0 = 8 * (lane % LPR);
            const uint4 qraw = *reinterpret_cast<const uint4*>(qs + i * LDH + c0);
            const uint4 kraw = *reinterpret_cast<const uint4*>(ks + i * LDH + c0);
            const uint32_t qw[4] = {qraw.x, qraw.y, qraw.z, qraw.w}, kw[4] = {kraw.x, kraw.y, kraw.z, kraw.w};
            float qo[8], ko[8], kg[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float fq, fk;
                if constexpr (kVec) {
                    const float d = Fs[i * LDF + c0 + e];
                    fq = __expf(Rb[e] + d);
                    fk = __expf(Eb[e] - d);
                } else {
                    fq = eq[i];
                    fk = ek[i];
                }
                if constexpr (D == Decay::None) fq = fk = 1.f;
                const float qe = unpack_elem<E>(qw, e), ke = unpack_elem<E>(kw, e) * rk[i];
                qo[e] = qe * rq[i] * fq;
                ko[e] = ke * fk;
                // one decay number per token: k · (rk · e^{b_i}), the product the forming scan makes
                // with φ (qk_rowf), so that both round K⊙γ alike
                if constexpr (kVec) kg[e] = ke * fq;
                else kg[e] = unpack_elem<E>(kw, e) * (rk[i] * fq);
            }
            if (Qg) {  // null when the scan reads q and k raw (p.qk_rowf)
                store_vec<E>(Qg + i * K + c0, qo);
                store_vec<E>(Kd + i * K + c0, ko);
            }
            if constexpr (kDelta) {
                if constexpr (kVec) __syncwarp();  // the row's Δ is read by all its lanes before K⊙γ takes half its bytes
                if (Kg) store_vec<E>(Kg + i * K + c0, kg);  // for the scan's W; else W's product below reads it here
                else store_vec<E>(kgs + i * LDG + c0, kg);
            }
        }
    }
    if constexpr (!kDelta) {
        // additive update: U = V, this warp's rows (zero past the end), 16 bytes per copy; nothing when
        // the scan reads v raw (U null)
        if (!p.U) return;
        E* Ug = static_cast<E*>(p.U) + slot * size_t(kChunk) * V;
        const bool vec_ok = (reinterpret_cast<uintptr_t>(vsrc) % 16 == 0) && (p.vs[1] % 8 == 0);
        const int per_row = V / 8;
        for (int idx = lane; idx < 16 * per_row; idx += 32) {
            const int i = r0 + idx / per_row, c0 = 8 * (idx % per_row);
            if (vec_ok) {
                const uint4 x = i < len ? *reinterpret_cast<const uint4*>(vsrc + i * p.vs[1] + c0) : make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4*>(Ug + i * V + c0) = x;
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) Ug[i * V + c0 + e] = i < len ? vsrc[i * p.vs[1] + c0 + e] : __float2bfloat16(0.f);
            }
        }
        return;
    } else {
        __syncthreads();  // Δ (or ka), raw k (or kb) and q are dead (A, L and v take their bytes); K⊙γ is complete
        // v arrives while the inverse runs (with Tw the scan reads it instead)
        if (!p.Tw) {
            if (V == 128) stage_rows<128, kPrepMmaThreads>(vs, LDV, vsrc, p.vs[1], len);
            else stage_rows<64, kPrepMmaThreads>(vs, LDV, vsrc, p.vs[1], len);
            cp_async_commit();
        }
        if (kVec && fast) {  // the blocks above the diagonal keep old bytes: the inverse reads A strictly below it
#pragma unroll
            for (int b = 0; b < 3; ++b) {
                if (b >= fast_blocks()) break;
                const int2 IJ = fast_block(b);
                for_each_acc(blkA[b], [&](int r, int c, float& x) { As[(16 * IJ.x + r) * LDA + 16 * IJ.y + c] = x; });
            }
        } else {
            for_each_acc(accA, [&](int r, int c, float& x) { As[(r0 + r) * LDA + c] = x; });
        }
        __syncthreads();
        // ---- L_II = (I + A_II)^{-1}, forward substitution, lane c < 16 → column c ----
        if (lane < 16) {
            const int o = r0, c = lane;
            float col[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                float x = i == c ? 1.f : 0.f;
#pragma unroll
                for (int j = 0; j < i; ++j) x -= (j >= c ? As[(o + i) * LDA + o + j] * col[j] : 0.f);
                col[i] = i < c ? 0.f : x;
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) Ls[(o + i) * LDL + o + c] = col[i];
        }
        __syncthreads();
        // ---- the blocks below the diagonal (tf32), as the 2×2 block inverse of the 32-row halves:
        // L_10 = −L_11 A_10 L_00 and L_32 = −L_33 A_32 L_22 (one 8-column half a warp), then
        // [L_20 L_21; L_30 L_31] = −L_b (A_ba L_a) with L_a, L_b the halves' inverses and A_ba A's
        // lower-left quarter (one block a warp for each product). Two steps deep instead of the three
        // of a column block per warp (warp 0 did L_10, L_20, L_30 in turn while warp 3 waited; that
        // barrier was ~6-7% of prepare's stall samples). Products' partial results X go to the unused
        // upper blocks of L: X_IJ in block (J, I). ----
        {
            // (I, J) = (1, 0) or (3, 2), columns 16J + 8h .. + 8
            const int I = warp < 2 ? 1 : 3, J = I - 1, h = warp & 1;
            float* X = Ls + 16 * J * LDL + 16 * I + 8 * h;
            float x[1][1][4];
            zero_acc(x);
            warp_gemm<float, 1, 1>(x, Tile<float>{As + 16 * I * LDA + 16 * J, LDA, 1},
                                   Tile<float>{Ls + 16 * J * LDL + 16 * J + 8 * h, LDL, 1}, 16);
            for_each_acc(x, [&](int r, int c, float& v) { X[r * LDL + c] = v; });
            __syncwarp();
            float y[1][1][4];
            zero_acc(y);
            warp_gemm<float, 1, 1>(y, Tile<float>{Ls + 16 * I * LDL + 16 * I, LDL, 1}, Tile<float>{X, LDL, 1}, 16);
            for_each_acc(y, [&](int r, int c, float& v) { Ls[(16 * I + r) * LDL + 16 * J + 8 * h + c] = -v; });
        }
        __syncthreads();  // L_10 and L_32
        const int Ib = 2 + (warp >> 1), Jb = warp & 1;  // this warp's block of the lower-left quarter
        {
            // X_IJ = A_I,[J,2) L_[J,2),J
            float x[1][2][4];
            zero_acc(x);
            warp_gemm<float, 1, 2>(x, Tile<float>{As + 16 * Ib * LDA + 16 * Jb, LDA, 1},
                                   Tile<float>{Ls + 16 * Jb * LDL + 16 * Jb, LDL, 1}, 32 - 16 * Jb);
            for_each_acc(x, [&](int r, int c, float& v) { Ls[(16 * Jb + r) * LDL + 16 * Ib + c] = v; });
        }
        __syncthreads();  // every X
        {
            // L_IJ = −Σ_{M = 2..I} L_IM X_MJ
            float y[1][2][4];
            zero_acc(y);
            for (int M = 2; M <= Ib; ++M)
                warp_gemm<float, 1, 2>(y, Tile<float>{Ls + 16 * Ib * LDL + 16 * M, LDL, 1},
                                       Tile<float>{Ls + 16 * Jb * LDL + 16 * M, LDL, 1}, 16);
            for_each_acc(y, [&](int r, int c, float& v) { Ls[(16 * Ib + r) * LDL + 16 * Jb + c] = -v; });
        }
        cp_async_wait_all();
        __syncthreads();  // L and v complete
        if (p.Tinv) {
            // the backward's per-chunk kernel reads T = L (the upper blocks of Ls held scratch: zeros out)
            float* Tg = p.Tinv + slot * kChunk * kChunk;
            for (int idx = tid; idx < kChunk * kChunk / 4; idx += kPrepMmaThreads) {
                const int i = idx / (kChunk / 4), j = 4 * (idx % (kChunk / 4));
                float4 v = *reinterpret_cast<const float4*>(Ls + i * LDL + j);
                v.x = j <= i ? v.x : 0.f;
                v.y = j + 1 <= i ? v.y : 0.f;
                v.z = j + 2 <= i ? v.z : 0.f;
                v.w = j + 3 <= i ? v.w : 0.f;
                *reinterpret_cast<float4*>(Tg + i * kChunk + j) = v;
            }
        }
        // ---- W = L diag(β) (K⊙γ), U = L diag(β) V for this warp's rows; L diag(β) rounded once to bf16 ----
        uint32_t a[4][4];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            if (s > warp) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = r0 + g + 8 * (e & 1), j = 16 * s + 2 * t + 8 * (e >> 1);
                const float2 l = *reinterpret_cast<const float2*>(Ls + i * LDL + j);
                a[s][e] = pack_bf16(l.x * betas[j], l.y * betas[j + 1]);
            }
        }
        if (p.Tw) {
            // the scan forms U and W (from raw k, or from the K⊙γ written above: FwdParams::Kg): T =
            // L diag(β) as rounded above, this warp's rows, zero above the diagonal blocks (their
            // bytes in Ls held scratch)
            E* Tg = static_cast<E*>(p.Tw) + slot * kChunk * kChunk;
#pragma unroll
            for (int s = 0; s < 4; ++s)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = r0 + g + 8 * (e & 1), j = 16 * s + 2 * t + 8 * (e >> 1);
                    *reinterpret_cast<uint32_t*>(Tg + i * kChunk + j) = s <= warp ? a[s][e] : 0u;
                }
        }
        const int mi = lane >> 3, r8 = lane & 7;
        // 64 output columns of X·(rows of src): src row-major [token][column], ldmatrix.trans for B
        auto product64 = [&](const E* src, int ld, int col0, E* dst, int dst_ld) {
            float acc[1][8][4];
            zero_acc(acc);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                if (s > warp) break;
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t x[4];
                    ldmatrix_x4_trans(x, src + (16 * s + (mi & 1) * 8 + r8) * ld + col0 + 16 * np + (mi >> 1) * 8);
                    const uint32_t b0[2] = {x[0], x[1]}, b1[2] = {x[2], x[3]};
                    mma16(acc[0][2 * np], a[s], b0, E());
                    mma16(acc[0][2 * np + 1], a[s], b1, E());
                }
            }
            store_acc<E>(acc, dst + r0 * dst_ld + col0, dst_ld);
        };
        // (null where the scan forms them: W with Tw and raw operands or Kg, U with Tw)
        if (p.W)
            for (int c0 = 0; c0 < K; c0 += 64) product64(kgs, LDG, c0, static_cast<E*>(p.W) + slot * kChunk * K, K);
        if (p.U)
            for (int c0 = 0; c0 < V; c0 += 64) product64(vs, LDV, c0, static_cast<E*>(p.U) + slot * size_t(kChunk) * V, V);
    }
}

// kConcurrent: the concurrent forward's prepare (FwdParams::ready), its own instantiation so that the
// other keeps its code (one body for both took the GDN prepare from 121 to 166 registers and 4% longer).
template <Decay D, Update Up, int K, bool kConcurrent = false>
__global__ void __launch_bounds__(kPrepMmaThreads, PrepMmaLayout<D, Up, K>::kMinBlocks)
    chunk_prepare_mma_kernel(const FwdParams p) {
    allow_dependent_launch();  // the next kernel's blocks may take the SMs the last wave leaves
    // With FwdParams::prep_order block b takes chunk prep_order[b / HV] and value head b % HV (the
    // blocks start in order), else chunk blockIdx.x of value head blockIdx.y.
    int chunk = blockIdx.x, hv = blockIdx.y;
    if (p.prep_order) {
        const int b = blockIdx.x + gridDim.x * blockIdx.y;
        chunk = p.prep_order[b / p.HV];
        hv = b % p.HV;
    }
    prepare_chunk_mma<D, Up, K>(p, chunk, hv);
    if constexpr (kConcurrent) publish_ready(p.ready + size_t(chunk) * p.HV + hv);  // chunks in the scans' order
}

template <Decay D, Update Up, int K>
void launch_prepare_mma(const FwdParams& fp, int n_chunks, const char* op, bool load_only = false) {
    constexpr size_t smem = PrepMmaLayout<D, Up, K>::bytes;
    static_assert(PrepMmaLayout<D, Up, K>::kMinBlocks * (smem + 1024) <= 228 * 1024,
                  "chunk_prepare_mma: the blocks per SM of the launch bounds must fit its shared memory");
    if constexpr (Up == Update::Delta) {  // the concurrent forward takes the delta rule only
        if (fp.ready) {
            raise_smem_limit<chunk_prepare_mma_kernel<D, Up, K, true>>(smem, op);
            if (load_only) return;
            chunk_prepare_mma_kernel<D, Up, K, true><<<dim3(n_chunks, fp.HV), kPrepMmaThreads, smem, launch_stream()>>>(fp);
            return check_cuda(cudaGetLastError(), op, "chunk_prepare_mma launch");
        }
    }
    if (load_only) return;
    raise_smem_limit<chunk_prepare_mma_kernel<D, Up, K>>(smem, op);
    chunk_prepare_mma_kernel<D, Up, K><<<dim3(n_chunks, fp.HV), kPrepMmaThreads, smem, launch_stream()>>>(fp);
    check_cuda(cudaGetLastError(), op, "chunk_prepare_mma launch");
}

}  // namespace hla::linear::cuda
