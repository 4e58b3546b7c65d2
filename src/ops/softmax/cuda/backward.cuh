// hla — the softmax family's CUDA backward: FlashAttention-2's key-block-parallel scheme on mma.sync.
//
// A block owns BN keys of one (sequence, kv head) and keeps their dK, dV in registers while it walks
// every query head of the group and every query block that can see them. Warps own 16 keys (and, at
// D = 256, one half of the channels). Per query block:
//   Sᵀ = K Qᵀ,  Pᵀ = exp2(Sᵀ·scale·log2e + bias − lse),  dPᵀ = V dAᵀ,  dSᵀ = Pᵀ ⊙ (dPᵀ − delta)
//   dV += Pᵀ dA,  dK += dSᵀ Q,  dQ += dS K (through shared memory, added atomically in fp32).
// Working transposed (keys as rows) lets Pᵀ and dSᵀ feed the dV/dK products straight from registers.
// Pre-pass: delta = Σ dO ⊙ o and the output-gate terms; post-passes: dQ to its dtype, and the
// forget-gate gradient as a suffix sum of (row sums − column sums) of dS.
#pragma once

#include "ops/softmax/cuda/common.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

template <int D_>
struct BwdTraits {
    static constexpr int D = D_;
    static constexpr int BN = 64;                     // keys per block
    static constexpr int BM = 64;                     // queries per step
    static constexpr int KW = BN / 16;                // key groups (warps along keys)
    static constexpr int DSPLIT = D <= 128 ? 1 : 2;   // channel halves at D = 256 (dK+dV = 128 regs)
    static constexpr int DW = D / DSPLIT;             // channels of dK, dV per warp
    static constexpr int NWARPS = KW * DSPLIT;
    static constexpr int THREADS = 32 * NWARPS;
    // K, V tiles + two stages of Q, dA (b16) + dSᵀ [BN][BM] (b16) + two stages of lse, delta + query
    // gate sums [BM] + key gate sums [BN] (fp32). 104 KiB at D = 128: two blocks per SM.
    static constexpr int SMEM = (2 * BN * D + 4 * BM * D + BN * BM) * 2 + (5 * BM + BN) * 4;
    // Epilogue staging of dK and dV (fp32, rows padded by 8 floats) over the tiles.
    static constexpr int OUT_STRIDE = D + 8;
    static_assert(2 * BN * OUT_STRIDE * 4 <= SMEM, "dK/dV staging must fit in the tiles");
};

// Row index of (batch, token, head) in the compact [B, T, HQ] workspaces.
__device__ __forceinline__ int64_t ws_row(const FwdParams& f, int batch, int64_t tok, int h) {
    return (int64_t(batch) * f.T + tok) * f.HQ + h;
}

// delta = Σ_d dO ⊙ o (o as the forward stored it, gated); with a gate also dA = dO ⊙ σ(z) (stored in
// q's dtype, the operand of the tensor-core products) and dz = dO ⊙ o ⊙ (1 − σ(z)). One warp per row.
template <class T>
__global__ void softmax_bwd_preprocess_kernel(const BwdParams b, int D) {
    const FwdParams& f = b.f;
    const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= int64_t(f.B) * f.T * f.HQ) return;
    const int h = int(row % f.HQ);
    const int64_t bt = row / f.HQ;
    const int t = int(bt % f.T), bb = int(bt / f.T);
    const int64_t ob = bb * f.o_s[0] + t * f.o_s[1] + h * f.o_s[2];
    const int64_t db = bb * b.do_s[0] + t * b.do_s[1] + h * b.do_s[2];
    const int64_t zb = bb * f.gate_s[0] + t * f.gate_s[1] + h * f.gate_s[2];
    const int64_t gb = bb * b.dgate_s[0] + t * b.dgate_s[1] + h * b.dgate_s[2];
    float delta = 0.f;
    for (int d = lane; d < D; d += 32) {
        const float dout = load_any(b.d_o, db + d, b.do_dtype);
        const float o = load_any(f.o, ob + d, f.o_dtype);
        delta += dout * o;
        if (f.gate) {
            const float sg = 1.f / (1.f + __expf(-load_any(f.gate, zb + d, f.gate_dtype)));
            static_cast<T*>(b.dA)[row * D + d] = T(dout * sg);
            if (b.dgate) store_any(b.dgate, gb + d, b.dgate_dtype, dout * o * (1.f - sg));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) delta += __shfl_xor_sync(0xffffffff, delta, o);
    if (lane == 0) b.delta[row] = delta;
}

// dq (its dtype) ← the fp32 accumulator.
static __global__ void softmax_bwd_postprocess_kernel(const BwdParams b, int D) {
    const FwdParams& f = b.f;
    const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (!b.dq || row >= int64_t(f.B) * f.T * f.HQ) return;
    const int h = int(row % f.HQ);
    const int64_t bt = row / f.HQ;
    const int t = int(bt % f.T), bb = int(bt / f.T);
    const int64_t qb = bb * b.dq_s[0] + t * b.dq_s[1] + h * b.dq_s[2];
    for (int d = lane; d < D; d += 32) store_any(b.dq, qb + d, b.dq_dtype, b.dq_acc[row * D + d]);
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
__global__ void __launch_bounds__(BwdTraits<D>::THREADS) softmax_bwd_kernel(const BwdParams b) {
    using Tr = BwdTraits<D>;
    constexpr int BN = Tr::BN, BM = Tr::BM, DW = Tr::DW, THREADS = Tr::THREADS;
    const FwdParams& f = b.f;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem);
    T* sV = sK + BN * D;
    T* sQ2 = sV + BN * D;       // [2][BM][D]: query blocks double-buffered
    T* sA2 = sQ2 + 2 * BM * D;  // [2][BM][D]: dA (the gradient of the ungated output)
    T* sS = sA2 + 2 * BM * D;   // dSᵀ [BN][BM], swizzled like a 64-channel tile
    float* sLse2 = reinterpret_cast<float*>(sS + BN * BM);  // [2][BM], natural log as stored
    float* sDelta2 = sLse2 + 2 * BM;                          // [2][BM]
    float* sPq = sDelta2 + 2 * BM;  // P_i = Σ_{s=j0+1..i} g_s of the block's queries
    float* sPk = sPq + BM;          // P_j of the block's keys

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kw = warp % Tr::KW, dw = warp / Tr::KW;
    const int n_block = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
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

    float dk[DW / 8][4], dv[DW / 8][4];
#pragma unroll
    for (int i = 0; i < DW / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    const int rk = kw * 16 + lane / 4;  // local key rows of this thread: rk, rk + 8
    const int c_lo = 2 * (lane % 4);
    const float scale_log2 = f.scale_log2;

    // The (query head, query block) pairs this key block meets, flattened so that the next pair's Q,
    // dA, lse and delta stream in (cp.async) while the current one computes.
    const int nq = (q_hi - q_lo + BM - 1) / BM;
    const int n_iter = nq * f.G;
    auto issue_loads = [&](int it, int buf) {
        const int h = kvh * f.G + it / nq, t0 = q_lo + (it % nq) * BM, mq = min(BM, q_hi - t0);
        const T* qb = static_cast<const T*>(f.q) + batch * f.q_s[0] + (start + t0) * f.q_s[1] + h * f.q_s[2];
        load_tile_async<BM, D, THREADS>(sQ2 + buf * BM * D, qb, f.q_s[1], mq);
        if (f.gate) {
            const T* ab = static_cast<const T*>(b.dA) + ws_row(f, batch, start + t0, h) * D;
            load_tile_async<BM, D, THREADS>(sA2 + buf * BM * D, ab, int64_t(f.HQ) * D, mq);
        } else {
            const T* ab = static_cast<const T*>(b.d_o) + batch * b.do_s[0] + (start + t0) * b.do_s[1] + h * b.do_s[2];
            load_tile_async<BM, D, THREADS>(sA2 + buf * BM * D, ab, b.do_s[1], mq);
        }
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const bool ok = r < mq;
            cp_async4(sLse2 + buf * BM + r, f.lse + (ok ? batch * f.lse_s[0] + h * f.lse_s[1] + (start + t0 + r) * f.lse_s[2] : 0), ok);
            cp_async4(sDelta2 + buf * BM + r, b.delta + (ok ? ws_row(f, batch, start + t0 + r, h) : 0), ok);
        }
    };
    if (n_iter > 0) issue_loads(0, 0);
    cp_async_commit();

    float q_carry = 0.f;  // warp 0: P at the last query of the previous block
    float colsum[2] = {0.f, 0.f};
    for (int it = 0; it < n_iter; ++it) {
        const int buf = it & 1;
        const int h = kvh * f.G + it / nq, t0 = q_lo + (it % nq) * BM, mq = min(BM, q_hi - t0);
        const T* sQ = sQ2 + buf * BM * D;
        const T* sA = sA2 + buf * BM * D;
        const float* sLse = sLse2 + buf * BM;
        const float* sDelta = sDelta2 + buf * BM;
        auto g_at = [&](int t) { return load_any(f.g, batch * f.g_s[0] + (start + t) * f.g_s[1] + h * f.g_s[2], f.g_dtype); };
        // Every thread finished the previous iteration (end-of-iteration barrier), so the other buffer
        // and the gate sums are free.
        if (it + 1 < n_iter) issue_loads(it + 1, buf ^ 1);
        cp_async_commit();
        if (it % nq == 0) colsum[0] = colsum[1] = 0.f;
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
        cp_async_wait<1>();
        __syncthreads();

        // Sᵀ = K Qᵀ and dPᵀ = V dAᵀ for this warp's 16 keys × BM queries.
        float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t ak[4], av[4];
            ldmatrix_x4(ak, smem_addr(sK + swz<D>(kw * 16 + (lane % 16), kk * 2 + lane / 16)));
            ldmatrix_x4(av, smem_addr(sV + swz<D>(kw * 16 + (lane % 16), kk * 2 + lane / 16)));
#pragma unroll
            for (int nn = 0; nn < BM / 16; ++nn) {
                uint32_t bq[4], ba[4];
                const int row = nn * 16 + (lane % 8) + (lane / 16) * 8, ch = kk * 2 + (lane / 8) % 2;
                ldmatrix_x4(bq, smem_addr(sQ + swz<D>(row, ch)));
                ldmatrix_x4(ba, smem_addr(sA + swz<D>(row, ch)));
                mma16816<T>(st[2 * nn], ak, bq[0], bq[1]);
                mma16816<T>(st[2 * nn + 1], ak, bq[2], bq[3]);
                mma16816<T>(dpt[2 * nn], av, ba[0], ba[1]);
                mma16816<T>(dpt[2 * nn + 1], av, ba[2], ba[3]);
            }
        }

        // Pᵀ and dSᵀ; element e of block nb: key rk (+8 for e ≥ 2), query nb·8 + c_lo + (e & 1).
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = nb * 8 + c_lo + (e & 1);
                // A row that saw no key has lse = −inf and P = 0 (its mask below); +inf keeps x finite-or-−inf.
                const float lse = sLse[ql];
                float x = st[nb][e] * scale_log2 - (lse == -INFINITY ? INFINITY : lse * kLog2e);
                if constexpr (GATED) x += (sPq[ql] - sPk[rk + (e >= 2 ? 8 : 0)]) * kLog2e;
                st[nb][e] = fast_exp2(x);
            }
        // Mask: one uniform branch around the tile, taken only by pairs of blocks that touch a
        // boundary (a test per score inside the unrolled loop compiles to a branch per score). The
        // select also clears the inf an invisible score may have produced.
        const bool need_mask = mq < BM || j0 + BN > len || (f.causal && j0 + BN - 1 > t0) ||
                               (f.window > 0 && t0 + mq - 1 - f.window >= j0);
        if (need_mask) {
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + rk + (e >= 2 ? 8 : 0), i = t0 + nb * 8 + c_lo + (e & 1);
                    const bool visible = j < len && i < t0 + mq && (!f.causal || j <= i) && (f.window <= 0 || j > i - f.window);
                    st[nb][e] = visible ? st[nb][e] : 0.f;
                }
        }
        float rowpart[BM / 8][2];
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb) {
            rowpart[nb][0] = rowpart[nb][1] = 0.f;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float ds = st[nb][e] * (dpt[nb][e] - sDelta[nb * 8 + c_lo + (e & 1)]);
                dpt[nb][e] = ds;
                if constexpr (GATED) {
                    colsum[e >> 1] += ds;
                    rowpart[nb][e & 1] += ds;
                }
            }
        }
        // Row sums of dS (per query): over this warp's 16 keys, then atomically across warps.
        if (has_g && b.dg && dw == 0) {
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float x = rowpart[nb][c];
                    x += __shfl_xor_sync(0xffffffff, x, 4);
                    x += __shfl_xor_sync(0xffffffff, x, 8);
                    x += __shfl_xor_sync(0xffffffff, x, 16);
                    const int i = t0 + nb * 8 + c_lo + c;
                    if (lane < 4 && i < t0 + mq) atomicAdd(&b.rowsum[ws_row(f, batch, start + i, h)], x);
                }
        }
        // dSᵀ to shared memory for dQ (b16, like the operands).
        if (b.dq && dw == 0) {
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int kl = rk + 8 * hf, ql = nb * 8 + c_lo;
                    T* dst = sS + swz<BM>(kl, ql / 8) + (ql % 8);
                    *reinterpret_cast<uint32_t*>(dst) = Pack2<T>::pack(dpt[nb][2 * hf], dpt[nb][2 * hf + 1]);
                }
        }

        // dV += Pᵀ dA and dK += dSᵀ Q over this warp's channels.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            uint32_t ap[4], as[4];
            ap[0] = Pack2<T>::pack(st[2 * kk][0], st[2 * kk][1]);
            ap[1] = Pack2<T>::pack(st[2 * kk][2], st[2 * kk][3]);
            ap[2] = Pack2<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
            ap[3] = Pack2<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
            as[0] = Pack2<T>::pack(dpt[2 * kk][0], dpt[2 * kk][1]);
            as[1] = Pack2<T>::pack(dpt[2 * kk][2], dpt[2 * kk][3]);
            as[2] = Pack2<T>::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            as[3] = Pack2<T>::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
            for (int dn = 0; dn < DW / 16; ++dn) {
                const int row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
                const int ch = (dw * DW) / 8 + dn * 2 + lane / 16;
                uint32_t ba[4], bq[4];
                ldmatrix_x4_trans(ba, smem_addr(sA + swz<D>(row, ch)));
                ldmatrix_x4_trans(bq, smem_addr(sQ + swz<D>(row, ch)));
                mma16816<T>(dv[2 * dn], ap, ba[0], ba[1]);
                mma16816<T>(dv[2 * dn + 1], ap, ba[2], ba[3]);
                mma16816<T>(dk[2 * dn], as, bq[0], bq[1]);
                mma16816<T>(dk[2 * dn + 1], as, bq[2], bq[3]);
            }
        }

        // dQ[BM × D] += scale · dS K: warp (query group w % 4, channel half) in 32-channel chunks.
        if (b.dq) {
            __syncthreads();
            constexpr int QG = BM / 16;                  // query groups
            constexpr int DQW = D / (Tr::NWARPS / QG);   // channels per warp
            const int qg = warp % QG, dq0 = (warp / QG) * DQW;
#pragma unroll
            for (int dc = 0; dc < DQW; dc += 32) {
                float qa[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i) qa[i][0] = qa[i][1] = qa[i][2] = qa[i][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t a[4];
                    const int mi = lane / 8;
                    ldmatrix_x4_trans(a, smem_addr(sS + swz<BM>(kk * 16 + (lane % 8) + (mi / 2) * 8, qg * 2 + (mi % 2))));
#pragma unroll
                    for (int dn = 0; dn < 2; ++dn) {
                        uint32_t bk[4];
                        ldmatrix_x4_trans(bk, smem_addr(sK + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                                                    (dq0 + dc) / 8 + dn * 2 + lane / 16)));
                        mma16816<T>(qa[2 * dn], a, bk[0], bk[1]);
                        mma16816<T>(qa[2 * dn + 1], a, bk[2], bk[3]);
                    }
                }
#pragma unroll
                for (int nb = 0; nb < 4; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int ql = qg * 16 + lane / 4 + (e >= 2 ? 8 : 0);
                        const int d = dq0 + dc + nb * 8 + c_lo + (e & 1);
                        if (t0 + ql < t0 + mq)
                            atomicAdd(&b.dq_acc[ws_row(f, batch, start + t0 + ql, h) * D + d], b.scale * qa[nb][e]);
                    }
            }
        }
        __syncthreads();  // this iteration's buffers, dSᵀ and gate sums are free for the next
        // Column sums of dS (per key) of this head, after its last query block: reduce over the quad.
        if (has_g && b.dg && dw == 0 && it % nq == nq - 1) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float x = colsum[hf];
                x += __shfl_xor_sync(0xffffffff, x, 1);
                x += __shfl_xor_sync(0xffffffff, x, 2);
                const int j = j0 + rk + 8 * hf;
                if (lane % 4 == 0 && j < len) b.colsum[ws_row(f, batch, start + j, h)] = x;
            }
        }
    }
    cp_async_wait<0>();

    __syncthreads();  // the tiles become the staging area of dK and dV

    // Store dK (× scale) and dV through shared memory: one short store loop of 8 channels a step
    // instead of an unrolled, dtype-branching store per accumulator.
    constexpr int OS = Tr::OUT_STRIDE;
    float* sdK = reinterpret_cast<float*>(smem);
    float* sdV = sdK + BN * OS;
#pragma unroll
    for (int db = 0; db < DW / 8; ++db)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int at = (rk + 8 * hf) * OS + dw * DW + db * 8 + c_lo;
            *reinterpret_cast<float2*>(sdK + at) = make_float2(dk[db][2 * hf] * b.scale, dk[db][2 * hf + 1] * b.scale);
            *reinterpret_cast<float2*>(sdV + at) = make_float2(dv[db][2 * hf], dv[db][2 * hf + 1]);
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
