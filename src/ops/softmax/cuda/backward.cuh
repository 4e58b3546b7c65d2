// hla — the softmax family's CUDA backward: FlashAttention-2's key-block-parallel scheme on mma.sync.
//
// A block owns BN keys of one (sequence, kv head) and keeps their dK, dV in registers while it walks
// every query head of the group and every query block that can see them. Per query block:
//   Sᵀ = K Qᵀ,  Pᵀ = exp2(Sᵀ·scale·log2e + bias − lse),  dPᵀ = V dAᵀ,  dSᵀ = Pᵀ ⊙ (dPᵀ − delta)
//   dV += Pᵀ dA,  dK += dSᵀ Q,  dQ += dS K.
// Warps form a grid of key groups × query slices (BwdTraits): a warp computes Sᵀ, dPᵀ for its 32 keys
// and its slice of the queries, and dK, dV for its 32 keys and its slice of the channels. Working
// transposed (keys as rows) lets its own Pᵀ, dSᵀ feed dV/dK straight from registers; the slices of
// the key group's other warps come through shared memory, where dSᵀ also serves dQ.
// dQ goes through shared memory once more: each warp stages its block of dQ (16 or 32 query rows ×
// 32 channels) in fp32 and the copy engine adds it into the fp32 dQ accumulator with one
// cp.reduce.async.bulk instead of an atomic per element. Where shared memory allows (D ≤ 128) dSᵀ is
// double-buffered and a query block's dQ is computed during the next one, so that an iteration needs
// one block-wide barrier, not two.
// Pre-pass: delta = Σ dO ⊙ o, lse in base 2 and the output-gate terms; post-passes: dQ to its dtype,
// and the forget-gate gradient as a suffix sum of (row sums − column sums) of dS.
#pragma once

#include "ops/softmax/cuda/common.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

// Barrier `id` (1–15; 0 is __syncthreads') among `threads` threads (a multiple of 32): orders the
// shared-memory accesses of a group of warps without stopping the rest of the block.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The fp32 dQ accumulator (workspace) is [B][HQ][D / S][T][S], S = dq_segment(D) = 32 floats (one
// 128-byte line): each (sequence row, head, channel segment) holds its T rows of S floats back to
// back, so that the 16 or 32 query rows a warp adds form one contiguous block and go in one bulk
// reduction. (With [B][T][HQ][D] rows it took
// one bulk instruction a row, which the compiler issues as a loop over the 16 lanes through uniform
// registers: ~10% of the backward's stall samples on the H100.) Within a row, 16-byte chunk k sits at
// chunk k ^ (t % 8), t the token: the staging tile, a verbatim copy of the block, then takes the
// warps' fragment stores without bank conflicts although its rows are not padded.
__host__ __device__ constexpr int dq_segment(int) { return 32; }

// Float offset of the row of (batch, token t, head h) in channel segment seg of the dQ accumulator,
// and the place of channel cc (0 ≤ cc < S) in that row.
__device__ __forceinline__ int64_t dq_acc_row(const FwdParams& f, int batch, int64_t t, int h, int D, int seg) {
    const int S = dq_segment(D);
    return (((int64_t(batch) * f.HQ + h) * (D / S) + seg) * f.T + t) * S;
}
__device__ __forceinline__ int dq_acc_col(int64_t t, int cc) { return (((cc >> 2) ^ int(t & 7)) << 2) | (cc & 3); }

template <int D_>
struct BwdTraits {
    static constexpr int D = D_;
    // 128 keys a block at D ≤ 128 (FlashAttention-2's block): each query block's Q and dA tiles are
    // copied in once per 128 keys and dQ is reduced once per 128 keys. At D = 256 the tiles of 128
    // keys do not fit next to the query buffers, so 64 keys.
    static constexpr int BN = D <= 128 ? 128 : 64;  // keys per block
    static constexpr int BM = 64;                   // queries per step
    static constexpr int NWARPS = 8;
    static constexpr int THREADS = 32 * NWARPS;
    // Warps as a WK × WQ grid: warp (kw, qw) owns KWT keys; it computes Sᵀ and dPᵀ for those keys and
    // the QWT queries qw·QWT…, and dK, dV for those keys and the DW channels qw·DW…. Its Pᵀ, dSᵀ go
    // to shared memory, where the other WQ − 1 warps of its key group read them for their own
    // channels. Against one warp owning 16 keys × all BM queries this cuts the shared-memory reads
    // of a step by ~20% (Q and dA fragments are shared by 32 keys instead of 16, and each warp reads
    // Q/dA for its DW channels only); the cost is one Pᵀ/dSᵀ store and a barrier per key group.
    static constexpr int WQ = D == 256 ? 4 : 2;  // D = 256: 64 channels a warp keeps dK + dV at 128 regs
    static constexpr int WK = NWARPS / WQ;
    static constexpr int KWT = BN / WK;          // 32 keys a warp
    static constexpr int MI = KWT / 16;          // m16 key tiles a warp
    static constexpr int QWT = BM / WQ;          // queries of a warp's Sᵀ, dPᵀ
    static constexpr int DW = D / WQ;            // channels of a warp's dK, dV
    static_assert(KWT % 16 == 0 && QWT % 16 == 0, "whole m16 / k16 tiles a warp");
    static_assert(DW % 16 == 0 && (DW & (DW - 1)) == 0, "ldmatrix offsets of a warp's channels are XORs");
    // dQ = dS K: warp w owns the DQM queries (w % QG)·DQM… and DQW channels from (w / QG)·DQW,
    // computed in chunks of DQC channels (one segment of the dQ accumulator, dq_segment), each staged
    // in fp32 in the accumulator's own layout and added to it by one bulk reduction.
    // D = 128: 32 queries × 32 channels a warp, 4 ldmatrix a k-step for 8 mma (16 × 64 took 5). D = 64
    // would leave 16 channels a warp, under one 32-float segment; at D = 256 the staging would not fit.
    static constexpr int DQM = D == 128 ? 32 : 16;
    static constexpr int QG = BM / DQM;
    static constexpr int DQW = D / (NWARPS / QG);
    static constexpr int DQC = dq_segment(D);
    static constexpr int DQ_STAGE = DQM * DQC;  // floats a warp
    // K, V tiles + two stages of Q, dA (b16) + Pᵀ and one or two dSᵀ [BN][BM] (b16) + dQ staging
    // (fp32) + two stages of lse, delta, query gate sums [BM] and key gate sums [BN] (fp32).
    static constexpr int tiles(int ds_bufs) { return (2 * BN * D + 4 * BM * D + (1 + ds_bufs) * BN * BM) * 2; }
    static constexpr int smem(int ds_bufs) { return tiles(ds_bufs) + NWARPS * DQ_STAGE * 4 + (6 * BM + 2 * BN) * 4; }
    // DB: dSᵀ double-buffered where it fits (D ≤ 128: 210 KiB at D = 128; not at D = 256). The dQ
    // product of a query block then runs in the next iteration, behind that iteration's one
    // block-wide barrier, instead of behind a second barrier of its own: one __syncthreads an
    // iteration fewer (H100, B=1 T=16384 H=16 fwd+bwd: 12.84 -> 12.33 ms together with DQM = 32).
    static constexpr bool DB = smem(2) <= 227 * 1024;
    static constexpr int TILES = tiles(DB ? 2 : 1);
    static constexpr int SMEM = smem(DB ? 2 : 1);
    static_assert(SMEM <= 227 * 1024, "shared memory per block");
    static_assert(NWARPS % QG == 0 && DQW % DQC == 0 && DQC % 32 == 0, "dQ warp tiling, 8 chunks a row");
    // Epilogue staging of dK and dV (fp32, rows padded by 8 floats) over the tiles.
    static constexpr int OUT_STRIDE = D + 8;
    static_assert(2 * BN * OUT_STRIDE * 4 <= TILES, "dK/dV staging must fit in the tiles");
    // Q/dA tile copies: thread tid moves 16-byte chunk tid % (D/8) of rows tid / (D/8) + k · RSTEP.
    static constexpr int RSTEP = THREADS / (D / 8);
    static_assert(RSTEP % 8 == 0 && BM % RSTEP == 0, "whole rows per copy round, swizzle phase kept");
};

// Row index of (batch, token, head) in the compact [B, T, HQ] workspaces.
__device__ __forceinline__ int64_t ws_row(const FwdParams& f, int batch, int64_t tok, int h) {
    return (int64_t(batch) * f.T + tok) * f.HQ + h;
}

// Per row: delta = Σ_d dO ⊙ o (o as the forward stored it, gated) and lse2 = lse · log2 e (+inf for a
// row that saw no key, so that its probabilities come out 0); with a gate also dA = dO ⊙ σ(z)
// (stored in q's dtype, the operand of the tensor-core products) and dz = dO ⊙ o ⊙ (1 − σ(z)).
// D/8 threads a row, 8 channels each, 16-byte loads where the dtype and alignment allow.
template <class T>
__global__ void softmax_bwd_preprocess_kernel(const BwdParams b, int D) {
    const FwdParams& f = b.f;
    const int tpr = D / 8;  // threads per row (8, 16 or 32: within a warp)
    const int64_t row = int64_t(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
    const int d0 = (threadIdx.x % tpr) * 8;
    const bool live = row < int64_t(f.B) * f.T * f.HQ;
    float delta = 0.f;
    if (live) {
        const int h = int(row % f.HQ);
        const int64_t bt = row / f.HQ;
        const int t = int(bt % f.T), bb = int(bt / f.T);
        const int64_t ob = bb * f.o_s[0] + t * f.o_s[1] + h * f.o_s[2] + d0;
        const int64_t db = bb * b.do_s[0] + t * b.do_s[1] + h * b.do_s[2] + d0;
        const int native = std::is_same<T, __half>::value ? 1 : 0;
        float dout[8], o[8];
        const T* o16 = static_cast<const T*>(f.o) + ob;
        const T* d16 = static_cast<const T*>(b.d_o) + db;
        if (f.o_dtype == native && b.do_dtype == native && reinterpret_cast<uintptr_t>(o16) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(d16) % 16 == 0) {
            const uint4 ov = *reinterpret_cast<const uint4*>(o16), dv = *reinterpret_cast<const uint4*>(d16);
            const T* op = reinterpret_cast<const T*>(&ov);
            const T* dp = reinterpret_cast<const T*>(&dv);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = float(op[i]), dout[i] = float(dp[i]);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = load_any(f.o, ob + i, f.o_dtype), dout[i] = load_any(b.d_o, db + i, b.do_dtype);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) delta += dout[i] * o[i];
        if (f.gate) {
            const int64_t zb = bb * f.gate_s[0] + t * f.gate_s[1] + h * f.gate_s[2] + d0;
            const int64_t gb = bb * b.dgate_s[0] + t * b.dgate_s[1] + h * b.dgate_s[2] + d0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float sg = 1.f / (1.f + __expf(-load_any(f.gate, zb + i, f.gate_dtype)));
                static_cast<T*>(b.dA)[row * D + d0 + i] = T(dout[i] * sg);
                if (b.dgate) store_any(b.dgate, gb + i, b.dgate_dtype, dout[i] * o[i] * (1.f - sg));
            }
        }
    }
    for (int o = tpr / 2; o > 0; o >>= 1) delta += __shfl_xor_sync(0xffffffff, delta, o);
    if (live && d0 == 0) {
        b.delta[row] = delta;
        const int h = int(row % f.HQ);
        const int64_t bt = row / f.HQ;
        const float lse = f.lse[(bt / f.T) * f.lse_s[0] + h * f.lse_s[1] + (bt % f.T) * f.lse_s[2]];
        b.lse2[row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
        // The main kernel adds the column sums of dS atomically, one term per query slice.
        if (b.dg) b.colsum[row] = 0.f;
    }
}

// dq (its dtype) ← the fp32 accumulator; D/8 threads a row, 8 channels each.
template <class T>
__global__ void softmax_bwd_postprocess_kernel(const BwdParams b, int D) {
    const FwdParams& f = b.f;
    const int tpr = D / 8;
    const int64_t row = int64_t(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
    const int d0 = (threadIdx.x % tpr) * 8;
    if (!b.dq || row >= int64_t(f.B) * f.T * f.HQ) return;
    const int h = int(row % f.HQ);
    const int64_t bt = row / f.HQ;
    const int t = int(bt % f.T), bb = int(bt / f.T);
    const int64_t qb = bb * b.dq_s[0] + t * b.dq_s[1] + h * b.dq_s[2] + d0;
    // Channels d0…d0+3 and d0+4…d0+7: chunks 2m and 2m + 1 of a row, swapped or not by the swizzle.
    const int S = dq_segment(D);
    const float* src = b.dq_acc + dq_acc_row(f, bb, t, h, D, d0 / S);
    const float4 lo = *reinterpret_cast<const float4*>(src + dq_acc_col(t, d0 % S));
    const float4 hi = *reinterpret_cast<const float4*>(src + dq_acc_col(t, d0 % S + 4));
    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    T* d16 = static_cast<T*>(b.dq) + qb;
    if (b.dq_dtype == (std::is_same<T, __half>::value ? 1 : 0) && reinterpret_cast<uintptr_t>(d16) % 16 == 0) {
        *reinterpret_cast<uint4*>(d16) = make_uint4(Pack2<T>::pack(v[0], v[1]), Pack2<T>::pack(v[2], v[3]),
                                                    Pack2<T>::pack(v[4], v[5]), Pack2<T>::pack(v[6], v[7]));
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) store_any(b.dq, qb + i, b.dq_dtype, v[i]);
    }
}

// dg_s = Σ_{t ≥ s} (rowsum_t − colsum_t) within each sequence; one warp per (head, sequence), a
// running suffix sum over 32-token chunks (warp scan inside a chunk, carry between chunks).
static __global__ void softmax_bwd_dg_kernel(const BwdParams b) {
    const FwdParams& f = b.f;
    const int h = blockIdx.x, seq = blockIdx.y, lane = threadIdx.x;
    int64_t start = 0;
    int len = f.T, batch = seq;
    if (f.cu_seqlens) {
        start = read_index(f.cu_seqlens, f.cu64, seq);
        len = int(read_index(f.cu_seqlens, f.cu64, seq + 1) - start);
        batch = 0;
    }
    float carry = 0.f;
    for (int base = len - 1; base >= 0; base -= 32) {
        const int t = base - lane;  // lane 0 holds the latest token of the chunk
        float x = 0.f;
        if (t >= 0) {
            const int64_t r = ws_row(f, batch, start + t, h);
            x = b.rowsum[r] - b.colsum[r];
        }
        // Inclusive scan along lanes (towards earlier tokens).
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffff, x, o);
            if (lane >= o) x += y;
        }
        if (t >= 0) b.dg[batch * b.dg_s[0] + (start + t) * b.dg_s[1] + h * b.dg_s[2]] = carry + x;
        carry += __shfl_sync(0xffffffff, x, 31);
    }
}


// GATED: with the forget-gate bias and its gradient sums. A compile-time choice, so that plain
// attention carries none of that code through the inner loop.
template <int D, class T, bool GATED>
__global__ void __launch_bounds__(BwdTraits<D>::THREADS, 1) softmax_bwd_kernel(const BwdParams b) {
    using Tr = BwdTraits<D>;
    constexpr int BN = Tr::BN, BM = Tr::BM, DW = Tr::DW, THREADS = Tr::THREADS;
    constexpr int WQ = Tr::WQ, MI = Tr::MI, QWT = Tr::QWT;
    const FwdParams& f = b.f;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = sK + BN * D;
    T* sQ2 = sV + BN * D;       // [2][BM][D]: query blocks double-buffered
    T* sA2 = sQ2 + 2 * BM * D;  // [2][BM][D]: dA (the gradient of the ungated output)
    T* sP = sA2 + 2 * BM * D;   // Pᵀ [BN][BM], swizzled like a 64-channel tile
    T* sS2 = sP + BN * BM;      // dSᵀ [DB ? 2 : 1][BN][BM], the same layout
    float* sDq = reinterpret_cast<float*>(smem + Tr::TILES);  // [NWARPS][16][DQC] dQ staging
    float* sLse2 = sDq + Tr::NWARPS * Tr::DQ_STAGE;           // [2][BM], base 2
    float* sDelta2 = sLse2 + 2 * BM;                           // [2][BM]
    float* sPq2 = sDelta2 + 2 * BM;  // [2][BM] P_i = Σ_{s=j0+1..i} g_s of the block's queries
    float* sPk2 = sPq2 + 2 * BM;     // [2][BN] P_j of the block's keys, by query head parity

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kw = warp / WQ, qw = warp % WQ;  // warp (kw, qw) of the WK × WQ grid (BwdTraits)
    const int key0 = kw * Tr::KWT;             // the warp's first key in the block
    // Key blocks in the slowest grid dimension, lowest first: under causal masking they meet the
    // most query blocks, so the longest blocks start first and the last wave is short ones.
    const int kvh = blockIdx.x, seq = blockIdx.y, n_block = blockIdx.z;
    int64_t start = 0;
    int len = f.T, batch = seq;
    if (f.cu_seqlens) {
        start = read_index(f.cu_seqlens, f.cu64, seq);
        len = int(read_index(f.cu_seqlens, f.cu64, seq + 1) - start);
        batch = 0;
    }
    const int j0 = n_block * BN;
    if (j0 >= len) return;
    const int nkeys = min(BN, len - j0);
    constexpr bool has_g = GATED;
    // Queries that can see a key of this block.
    const int q_lo = f.causal ? j0 : 0;
    const int q_hi = f.window > 0 ? min(len, j0 + nkeys - 1 + f.window) : len;

    const T* kb = static_cast<const T*>(f.k) + batch * f.k_s[0] + (start + j0) * f.k_s[1] + kvh * f.k_s[2];
    const T* vb = static_cast<const T*>(f.v) + batch * f.v_s[0] + (start + j0) * f.v_s[1] + kvh * f.v_s[2];
    load_tile_async<BN, D, THREADS>(sK, kb, f.k_s[1], nkeys);
    load_tile_async<BN, D, THREADS>(sV, vb, f.v_s[1], nkeys);
    cp_async_commit();

    float dk[MI][DW / 8][4], dv[MI][DW / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < DW / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[mi][i][e] = dv[mi][i][e] = 0.f;

    // Local key rows of this thread: rk + 16·mi (+ 8); query columns qc + 8·nb (+ 1).
    const int rk = key0 + lane / 4;
    const int c_lo = 2 * (lane % 4);
    const int qc = qw * QWT + c_lo;
    const float scale_log2 = f.scale_log2;

    // Per-lane ldmatrix offsets (bytes, within a tile). The swizzle XORs the chunk with row % 8 and
    // every fragment row offset below is a multiple of 8, so a fragment at (row r0 + 16·i, chunk
    // c0 | C), with C even and its bits disjoint from c0's, sits at base(r0, c0) XOR 16·C + 16·i rows:
    // one base a lane and compile-time offsets, instead of the swizzle recomputed per load.
    const int r_a = lane % 16, c_a = lane / 16;                          // A operand, non-transposed
    const int r_b = (lane % 8) + (lane / 16) * 8, c_b = (lane / 8) % 2;  // B operand, non-transposed
    const int r_t = (lane % 8) + ((lane / 8) % 2) * 8, c_t = lane / 16;  // B operand, transposed
    auto swz_bytes = [](int row, int chunk, int cols) { return uint32_t(row * cols + ((chunk ^ (row & 7)) << 3)) * 2; };
    const uint32_t kv_a = swz_bytes(key0 + r_a, c_a, D);            // K, V tiles (S, dP)
    const uint32_t q_b = swz_bytes(qw * QWT + r_b, c_b, D);         // Q, dA tiles (S, dP)
    const uint32_t q_t = swz_bytes(r_t, c_t, D) ^ (qw * DW * 2);    // Q, dA tiles (dK, dV)
    const uint32_t p_a = swz_bytes(key0 + r_a, c_a, BM);            // Pᵀ, dSᵀ tiles (dK, dV)
    const uint32_t sP0 = smem_addr(sP);
    // This thread's Pᵀ / dSᵀ stores: element offset of (row rk, column qc), XOR 8·nb for block nb.
    const int ps_at = swz<BM>(rk, qw * (QWT / 8)) + c_lo;
    const uint32_t sK0 = smem_addr(sK), sV0 = smem_addr(sV);

    // Q/dA tile copies: this thread's rows and chunk, fixed over the loop.
    constexpr int CH = D / 8;
    const int cp_row = threadIdx.x / CH, cp_chunk = threadIdx.x % CH;
    const int cp_dst = swz_bytes(cp_row, cp_chunk, D) / 2;

    // The (query head, query block) pairs this key block meets, flattened so that the next pair's Q,
    // dA, lse and delta stream in (cp.async) while the current one computes.
    const int nq = (q_hi - q_lo + BM - 1) / BM;
    const int n_iter = nq * f.G;
    auto issue_loads = [&](int it, int buf) {
        const int h = kvh * f.G + it / nq, t0 = q_lo + (it % nq) * BM, mq = min(BM, q_hi - t0);
        const T* qb = static_cast<const T*>(f.q) + batch * f.q_s[0] + (start + t0) * f.q_s[1] + h * f.q_s[2];
        const T* ab;
        int64_t a_s;
        if (f.gate) {
            ab = static_cast<const T*>(b.dA) + ws_row(f, batch, start + t0, h) * D;
            a_s = int64_t(f.HQ) * D;
        } else {
            ab = static_cast<const T*>(b.d_o) + batch * b.do_s[0] + (start + t0) * b.do_s[1] + h * b.do_s[2];
            a_s = b.do_s[1];
        }
        T* dq = sQ2 + buf * BM * D + cp_dst;
        T* da = sA2 + buf * BM * D + cp_dst;
#pragma unroll
        for (int i = 0; i < BM / Tr::RSTEP; ++i) {
            const int r = cp_row + i * Tr::RSTEP;
            const bool ok = r < mq;
            cp_async16(dq + i * Tr::RSTEP * D, qb + (ok ? int64_t(r) * f.q_s[1] + cp_chunk * 8 : 0), ok);
            cp_async16(da + i * Tr::RSTEP * D, ab + (ok ? int64_t(r) * a_s + cp_chunk * 8 : 0), ok);
        }
        if (threadIdx.x < 2 * BM) {
            const int r = threadIdx.x % BM;
            const bool ok = r < mq;
            const float* src = threadIdx.x < BM ? b.lse2 : b.delta;
            float* dst = (threadIdx.x < BM ? sLse2 : sDelta2) + buf * BM + r;
            cp_async4(dst, src + (ok ? ws_row(f, batch, start + t0 + r, h) : 0), ok);
        }
    };
    if (n_iter > 0) issue_loads(0, 0);
    cp_async_commit();

    // dQ staging of this warp and its bulk-reduce bookkeeping.
    constexpr int QG = Tr::QG, DQW = Tr::DQW, DQC = Tr::DQC, DQM = Tr::DQM, MQ = DQM / 16;
    const int qg = warp % QG, dq0 = (warp / QG) * DQW;
    float* sDqw = sDq + warp * Tr::DQ_STAGE;

    // dQ[BM × D] += scale · dS K for the query block of iteration itq: this warp's DQM queries × DQW
    // channels, in chunks of DQC. Reads dSᵀ (its buffer complete: behind a block-wide barrier) and K.
    auto dq_step = [&](int itq) {
        if (!b.dq) return;
        const int h = kvh * f.G + itq / nq, t0 = q_lo + (itq % nq) * BM, mq = min(BM, q_hi - t0);
        const uint32_t sS0 = smem_addr(sS2 + (Tr::DB ? (itq & 1) : 0) * BN * BM);
        const int row0 = t0 + qg * DQM;              // this warp's first query row
        const int nrows = min(DQM, t0 + mq - row0);  // its rows inside the sequence
        // Staging offset of this lane's (row lane/4 (+8, +16, +24), columns c_lo, c_lo+1) in the row
        // layout of dq_acc_col (rows 8 apart share the swizzle key); XOR 8·nb for block nb.
        const int st_at = (lane / 4) * DQC + dq_acc_col(start + row0 + lane / 4, c_lo);
        // dSᵀ is stored [key][query]: its transposed fragments are the A operand dS (this warp's m16
        // tile mt at chunk XOR 2·mt). K's chunk (dq0 + dc)/8 + 2·dn has disjoint bits (dq0/8 a
        // multiple of DQW/8, dc/8 of DQC/8). Formed here, not kept live through the loop.
        const uint32_t s_a = swz_bytes(r_b, qg * (DQM / 8) + c_b, BM);
        const uint32_t k_t = swz_bytes(r_t, c_t, D) ^ (dq0 * 2);
#pragma unroll
        for (int dc = 0; dc < DQW; dc += DQC) {
            float qa[MQ][DQC / 8][4];
#pragma unroll
            for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
                for (int i = 0; i < DQC / 8; ++i) qa[mt][i][0] = qa[mt][i][1] = qa[mt][i][2] = qa[mt][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[MQ][4];
#pragma unroll
                for (int mt = 0; mt < MQ; ++mt) ldmatrix_x4_trans(a[mt], sS0 + ((s_a ^ (mt << 5)) + kk * 16 * BM * 2));
#pragma unroll
                for (int dn = 0; dn < DQC / 16; ++dn) {
                    uint32_t bk[4];
                    ldmatrix_x4_trans(bk, sK0 + ((k_t ^ ((dc + 16 * dn) * 2)) + kk * 16 * D * 2));
#pragma unroll
                    for (int mt = 0; mt < MQ; ++mt) {
                        mma16816<T>(qa[mt][2 * dn], a[mt], bk[0], bk[1]);
                        mma16816<T>(qa[mt][2 * dn + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
            // The staging buffer is free once this warp's previous reduction has read it.
            if (lane == 0) bulk_wait_read<0>();
            __syncwarp();
#pragma unroll
            for (int mt = 0; mt < MQ; ++mt)
#pragma unroll
                for (int nb = 0; nb < DQC / 8; ++nb)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf)
                        *reinterpret_cast<float2*>(sDqw + ((st_at ^ (nb << 3)) + (16 * mt + 8 * hf) * DQC)) =
                            make_float2(qa[mt][nb][2 * hf] * b.scale, qa[mt][nb][2 * hf + 1] * b.scale);
            fence_proxy_async_smem();
            __syncwarp();
            if (lane == 0) {
                if (nrows > 0)
                    bulk_reduce_add_f32(b.dq_acc + dq_acc_row(f, batch, start + row0, h, D, (dq0 + dc) / DQC), sDqw,
                                        uint32_t(nrows * DQC * 4));
                bulk_commit();
            }
        }
    };

    float q_carry = 0.f;  // warp 0: P at the last query of the previous block
    float colsum[MI][2] = {};
    for (int it = 0; it < n_iter; ++it) {
        const int buf = it & 1;
        const int h = kvh * f.G + it / nq, t0 = q_lo + (it % nq) * BM, mq = min(BM, q_hi - t0);
        const uint32_t sQ = smem_addr(sQ2 + buf * BM * D);
        const uint32_t sA = smem_addr(sA2 + buf * BM * D);
        const float* sLse = sLse2 + buf * BM;
        const float* sDelta = sDelta2 + buf * BM;
        float* sPq = sPq2 + buf * BM;
        const int hbuf = (it / nq) & 1;
        float* sPk = sPk2 + hbuf * BN;
        T* sS = sS2 + (Tr::DB ? buf : 0) * BN * BM;
        const uint32_t sS0 = smem_addr(sS);
        auto g_at = [&](int t) { return load_any(f.g, batch * f.g_s[0] + (start + t) * f.g_s[1] + h * f.g_s[2], f.g_dtype); };
        // Without DB: every warp passed this block's last barrier after its reads of the other buffer
        // (the S, dP, dK and dV products of the previous iteration), so that buffer is free.
        if constexpr (!Tr::DB) {
            if (it + 1 < n_iter) issue_loads(it + 1, buf ^ 1);
            cp_async_commit();
        }
        if (it % nq == 0) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) colsum[mi][0] = colsum[mi][1] = 0.f;
        }
        if (has_g && warp == 0) {
            if (it % nq == 0) {  // P_j = Σ_{s=j0+1..j} g_s of this block's keys
                float v[BN / 32];
#pragma unroll
                for (int e = 0; e < BN / 32; ++e) {
                    const int c = lane * (BN / 32) + e;
                    v[e] = c > 0 && j0 + c < len ? g_at(j0 + c) : 0.f;
                }
                warp_scan<BN / 32>(v, 0.f, sPk, /*suffix=*/false, /*exclusive=*/false);
            }
            // P_i for i in [t0, t0 + BM): continue the prefix from the key block start j0.
            const float base = t0 == j0 || it % nq == 0 ? 0.f : q_carry;
            float v[BM / 32];
#pragma unroll
            for (int e = 0; e < BM / 32; ++e) {
                const int i = t0 + lane * (BM / 32) + e;
                v[e] = i > j0 && i < len ? g_at(i) : 0.f;
            }
            q_carry = base + warp_scan<BM / 32>(v, base, sPq, /*suffix=*/false, /*exclusive=*/false);
        }
        // The gate sums above went to buffers whose last readers (two iterations or one query head
        // back) passed a barrier that warp 0 passed too.
        if constexpr (Tr::DB) {
            // One block-wide barrier an iteration: it makes this iteration's copies visible, and every
            // warp is past the previous iteration's products, so the other Q/dA buffer is free for the
            // next copies and the previous dSᵀ is complete for its dQ (taken below, before the next
            // barrier, after which that dSᵀ buffer is written again).
            cp_async_wait<0>();
            __syncthreads();
            if (it + 1 < n_iter) issue_loads(it + 1, buf ^ 1);
            cp_async_commit();
        } else {
            cp_async_wait<1>();
            __syncthreads();
        }

        // Sᵀ = K Qᵀ and dPᵀ = V dAᵀ for this warp's KWT keys × QWT queries.
        float st[MI][QWT / 8][4], dpt[MI][QWT / 8][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int i = 0; i < QWT / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[mi][i][e] = dpt[mi][i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ak[MI][4], av[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                ldmatrix_x4(ak[mi], sK0 + ((kv_a ^ (kk << 5)) + mi * 16 * D * 2));
                ldmatrix_x4(av[mi], sV0 + ((kv_a ^ (kk << 5)) + mi * 16 * D * 2));
            }
#pragma unroll
            for (int nn = 0; nn < QWT / 16; ++nn) {
                uint32_t bq[4], ba[4];
                const uint32_t off = (q_b ^ (kk << 5)) + nn * 16 * D * 2;
                ldmatrix_x4(bq, sQ + off);
                ldmatrix_x4(ba, sA + off);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma16816<T>(st[mi][2 * nn], ak[mi], bq[0], bq[1]);
                    mma16816<T>(st[mi][2 * nn + 1], ak[mi], bq[2], bq[3]);
                    mma16816<T>(dpt[mi][2 * nn], av[mi], ba[0], ba[1]);
                    mma16816<T>(dpt[mi][2 * nn + 1], av[mi], ba[2], ba[3]);
                }
            }
        }

        // Pᵀ and dSᵀ; element e of block (mi, nb): key rk + 16·mi (+8 for e ≥ 2), query
        // qc + nb·8 + (e & 1).
        float pk[MI][2] = {};
        if constexpr (GATED) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                pk[mi][0] = sPk[rk + 16 * mi] * kLog2e, pk[mi][1] = sPk[rk + 16 * mi + 8] * kLog2e;
        }
#pragma unroll
        for (int nb = 0; nb < QWT / 8; ++nb) {
            const float2 lse = *reinterpret_cast<const float2*>(sLse + qc + nb * 8);
            float2 pq = make_float2(0.f, 0.f);
            if constexpr (GATED) pq = *reinterpret_cast<const float2*>(sPq + qc + nb * 8);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    // lse2 is +inf for a row that saw no key: x = −inf, P = 0 (and its mask below).
                    float x = fmaf(st[mi][nb][e], scale_log2, -((e & 1) ? lse.y : lse.x));
                    if constexpr (GATED) x += ((e & 1) ? pq.y : pq.x) * kLog2e - pk[mi][e >> 1];
                    st[mi][nb][e] = fast_exp2(x);
                }
        }
        // Mask: one uniform branch around the tile, taken only by pairs of blocks that touch a
        // boundary (a test per score inside the unrolled loop compiles to a branch per score). The
        // select also clears the inf an invisible score may have produced.
        const bool need_mask = mq < BM || j0 + BN > len || (f.causal && j0 + BN - 1 > t0) ||
                               (f.window > 0 && t0 + mq - 1 - f.window >= j0);
        if (need_mask) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int nb = 0; nb < QWT / 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = j0 + rk + 16 * mi + (e >= 2 ? 8 : 0), i = t0 + qc + nb * 8 + (e & 1);
                        const bool visible = j < len && i < t0 + mq && (!f.causal || j <= i) &&
                                             (f.window <= 0 || j > i - f.window);
                        st[mi][nb][e] = visible ? st[mi][nb][e] : 0.f;
                    }
        }
        float rowpart[QWT / 8][2];
#pragma unroll
        for (int nb = 0; nb < QWT / 8; ++nb) {
            const float2 dl = *reinterpret_cast<const float2*>(sDelta + qc + nb * 8);
            rowpart[nb][0] = rowpart[nb][1] = 0.f;
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float ds = st[mi][nb][e] * (dpt[mi][nb][e] - ((e & 1) ? dl.y : dl.x));
                    dpt[mi][nb][e] = ds;
                    if constexpr (GATED) {
                        colsum[mi][e >> 1] += ds;
                        rowpart[nb][e & 1] += ds;
                    }
                }
        }
        // Row sums of dS (per query): over this warp's keys, then atomically across the WK warps.
        if (has_g && b.dg) {
#pragma unroll
            for (int nb = 0; nb < QWT / 8; ++nb)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float x = rowpart[nb][c];
                    x += __shfl_xor_sync(0xffffffff, x, 4);
                    x += __shfl_xor_sync(0xffffffff, x, 8);
                    x += __shfl_xor_sync(0xffffffff, x, 16);
                    const int i = t0 + qc + nb * 8 + c;
                    if (lane < 4 && i < t0 + mq) atomicAdd(&b.rowsum[ws_row(f, batch, start + i, h)], x);
                }
        }
        // Pᵀ and dSᵀ in b16, like the operands: to shared memory for the key group's other warps
        // (and dSᵀ for dQ), and kept in registers as this warp's own A fragments.
        uint32_t pp[MI][QWT / 8][2], ps[MI][QWT / 8][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int nb = 0; nb < QWT / 8; ++nb)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    pp[mi][nb][hf] = Pack2<T>::pack(st[mi][nb][2 * hf], st[mi][nb][2 * hf + 1]);
                    ps[mi][nb][hf] = Pack2<T>::pack(dpt[mi][nb][2 * hf], dpt[mi][nb][2 * hf + 1]);
                    const int at = (ps_at ^ (nb << 3)) + (16 * mi + 8 * hf) * BM;
                    *reinterpret_cast<uint32_t*>(sP + at) = pp[mi][nb][hf];
                    *reinterpret_cast<uint32_t*>(sS + at) = ps[mi][nb][hf];
                }

        // The previous query block's dQ, between this warp's Pᵀ/dSᵀ stores and its wait for the key
        // group's: the wait is shorter, and the registers of Sᵀ, dPᵀ are dead by now (no spill, which
        // the same call after dK, dV had: 4 bytes). H100, B=1 T=16384 fwd+bwd, same call: 12.10–12.29
        // ms here, 12.32–12.38 after dK/dV.
        if constexpr (Tr::DB) {
            if (it > 0) dq_step(it - 1);
        }
        // dV += Pᵀ dA and dK += dSᵀ Q over this warp's keys and channels. The BM queries come in WQ
        // slices: this warp's own first (A fragments from registers), then the key group's other
        // warps' slices from shared memory once the group has stored them (named barrier 1 + kw).
#pragma unroll
        for (int jq = 0; jq < WQ; ++jq) {
            if (jq == 1) named_barrier_sync(1 + kw, 32 * WQ);
            const int slice = (qw + jq) % WQ;
#pragma unroll
            for (int kl = 0; kl < QWT / 16; ++kl) {
                const int kk = slice * (QWT / 16) + kl;  // k16 step over the BM queries
                uint32_t ap[MI][4], as[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    if (jq == 0) {
                        ap[mi][0] = pp[mi][2 * kl][0], ap[mi][1] = pp[mi][2 * kl][1];
                        ap[mi][2] = pp[mi][2 * kl + 1][0], ap[mi][3] = pp[mi][2 * kl + 1][1];
                        as[mi][0] = ps[mi][2 * kl][0], as[mi][1] = ps[mi][2 * kl][1];
                        as[mi][2] = ps[mi][2 * kl + 1][0], as[mi][3] = ps[mi][2 * kl + 1][1];
                    } else {
                        const uint32_t off = (p_a ^ (kk << 5)) + mi * 16 * BM * 2;
                        ldmatrix_x4(ap[mi], sP0 + off);
                        ldmatrix_x4(as[mi], sS0 + off);
                    }
                }
#pragma unroll
                for (int dn = 0; dn < DW / 16; ++dn) {
                    const uint32_t off = (q_t ^ (dn << 5)) + kk * 16 * D * 2;
                    uint32_t ba[4], bq[4];
                    ldmatrix_x4_trans(ba, sA + off);
                    ldmatrix_x4_trans(bq, sQ + off);
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        mma16816<T>(dv[mi][2 * dn], ap[mi], ba[0], ba[1]);
                        mma16816<T>(dv[mi][2 * dn + 1], ap[mi], ba[2], ba[3]);
                        mma16816<T>(dk[mi][2 * dn], as[mi], bq[0], bq[1]);
                        mma16816<T>(dk[mi][2 * dn + 1], as[mi], bq[2], bq[3]);
                    }
                }
            }
        }

        if constexpr (!Tr::DB) {
            // dSᵀ is complete, and every warp is done with this iteration's Q, dA, lse and delta
            // buffer, which the next iteration's copies overwrite.
            __syncthreads();
            dq_step(it);
        }
        // Column sums of dS (per key) of this head, after its last query block: reduce over the
        // quad, then atomically across the WQ warps that saw the other queries.
        if (has_g && b.dg && it % nq == nq - 1) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float x = colsum[mi][hf];
                    x += __shfl_xor_sync(0xffffffff, x, 1);
                    x += __shfl_xor_sync(0xffffffff, x, 2);
                    const int j = j0 + rk + 16 * mi + 8 * hf;
                    if (lane % 4 == 0 && j < len) atomicAdd(&b.colsum[ws_row(f, batch, start + j, h)], x);
                }
        }
    }
    if constexpr (Tr::DB) {
        if (n_iter > 0) {  // the last query block's dQ: its dSᵀ complete behind one more barrier
            __syncthreads();
            dq_step(n_iter - 1);
        }
    }
    cp_async_wait<0>();
    if (lane == 0) bulk_wait_all();  // the dQ reductions are done before the block's memory goes

    __syncthreads();  // the tiles become the staging area of dK and dV

    // Store dK (× scale) and dV through shared memory: one short store loop of 8 channels a step
    // instead of an unrolled, dtype-branching store per accumulator.
    constexpr int OS = Tr::OUT_STRIDE;
    float* sdK = reinterpret_cast<float*>(smem);
    float* sdV = sdK + BN * OS;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int db = 0; db < DW / 8; ++db)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int at = (rk + 16 * mi + 8 * hf) * OS + qw * DW + db * 8 + c_lo;
                *reinterpret_cast<float2*>(sdK + at) =
                    make_float2(dk[mi][db][2 * hf] * b.scale, dk[mi][db][2 * hf + 1] * b.scale);
                *reinterpret_cast<float2*>(sdV + at) = make_float2(dv[mi][db][2 * hf], dv[mi][db][2 * hf + 1]);
            }
    __syncthreads();
    const int native = std::is_same<T, __half>::value ? 1 : 0;
    auto store8 = [&](void* dst, int dtype, int64_t at, const float* src) {
        T* d16 = static_cast<T*>(dst) + at;
        if (dtype == native && reinterpret_cast<uintptr_t>(d16) % 16 == 0) {
            const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
            *reinterpret_cast<uint4*>(d16) = make_uint4(Pack2<T>::pack(lo.x, lo.y), Pack2<T>::pack(lo.z, lo.w),
                                                        Pack2<T>::pack(hi.x, hi.y), Pack2<T>::pack(hi.z, hi.w));
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) store_any(dst, at + i, dtype, src[i]);
        }
    };
    for (int e = threadIdx.x; e < nkeys * (D / 8); e += THREADS) {
        const int r = e / (D / 8), c = (e % (D / 8)) * 8;
        const int64_t tok = start + j0 + r;
        if (b.dk) store8(b.dk, b.dk_dtype, batch * b.dk_s[0] + tok * b.dk_s[1] + kvh * b.dk_s[2] + c, sdK + r * OS + c);
        if (b.dv) store8(b.dv, b.dv_dtype, batch * b.dv_s[0] + tok * b.dv_s[1] + kvh * b.dv_s[2] + c, sdV + r * OS + c);
    }
}

}  // namespace hla::softmax::cuda
