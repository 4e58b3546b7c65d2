// hla — KV-cache attention on CUDA (decode, small T_q, chunked prefill): split-KV on tensor cores.
//
// Decode reads every cached key and value once and does about two flops per byte, so it is bound by
// memory bandwidth. What sets the achieved bandwidth is the bytes in flight per SM (about 25 GB/s an
// SM × ~1.5 µs of latency under load ≈ 40 KB on an H100) and few instructions per byte moved:
//  - a block owns one (sequence, kv head, key split) and up to 16 · MT query rows of that kv head (its
//    G query heads × T_q tokens, padded to whole m16 tiles), so a K/V row read from memory serves every
//    query head and token that shares it: G = 4, T_q = 4 fill one tile and cost what T_q = 1 costs;
//  - each of the 4 warps walks its own contiguous quarter of the split downwards (the forget-gate
//    suffix sum is then a running sum), 16 keys a step, through its own cp.async ring of STAGES K/V
//    slots: STAGES − 1 steps (16 KB a warp at D = 128) are in flight while it computes one, and the
//    loop has no block-wide barrier, so a slow warp never stalls the others' copies;
//  - S = Q Kᵀ and O += P V run on mma.sync from ldmatrix reads of the 16-byte-copied tiles: a handful
//    of instructions per 16 keys instead of a shuffle reduction per key. P is split into a b16 high
//    part and a b16 remainder (P = hi + lo, about 16 mantissa bits), so the output keeps the accuracy
//    of fp32 CUDA-core arithmetic for the price of a second P·V product, free in a bandwidth-bound loop.
// Splits are merged by a second kernel with the usual log-sum-exp rescaling.
#pragma once

#include "ops/softmax/cuda/common.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

template <int D>
struct DecodeTraits {
    static constexpr int WARPS = 4;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int KEYS = 16;                   // keys a warp step: the k16 of the P·V product
    static constexpr int MAX_MT = D == 256 ? 1 : 2;   // m16 row tiles (the fp32 accumulator is MT · D/2 regs)
    // Ring depth: 2 blocks an SM at D = 128 (2 × 104 KB of 228 KB), 3 at D = 64, 1 at D = 256; each
    // keeps (STAGES − 1) × 16 × D × 4 bytes in flight a warp, 64 to 128 KB an SM.
    static constexpr int STAGES = D == 64 ? 4 : 3;
    static constexpr int SLOT = 2 * KEYS * D;         // b16 elements of one ring slot: K then V
    static constexpr int RING = WARPS * STAGES * SLOT;
    // Dynamic shared memory: Q tile, the rings, and with a forget gate the per-warp bias tile
    // [ROWS][KEYS] and running sums [ROWS] (fp32).
    static constexpr int smem(int mt, bool gates) {
        return (mt * 16 * D + RING) * 2 + (gates ? WARPS * mt * 16 * (KEYS + 1) * 4 : 0);
    }
    // After the loop the rings hold the four warps' fp32 accumulators for the merge.
    static_assert(WARPS * MAX_MT * 16 * D * 4 <= RING * 2, "merge buffer must fit in the rings");
};

// Page (or slot) and row inside it of token j of sequence n.
__device__ __forceinline__ void cache_pos(const DecodeParams& p, int n, int slot, int j, int64_t& page, int64_t& row) {
    if (p.block_table) {
        page = p.block_table[n * p.bt_s0 + j / p.page_size];
        row = j % p.page_size;
    } else {
        page = slot;
        row = j;
    }
}
// Cache element offset of token j of sequence n (head 0, channel 0) for the k/v strides `s`.
__device__ __forceinline__ int64_t cache_row(const DecodeParams& p, const int64_t* s, int n, int slot, int j) {
    int64_t page, row;
    cache_pos(p, n, slot, j, page, row);
    return page * s[0] + row * s[1];
}

template <class T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

// (x, y) = hi + lo with hi the b16 rounding and lo the b16 rounding of the remainder: hi + lo carries
// about twice the b16 mantissa, enough for fp32-class P·V products on b16 tensor cores.
template <class T>
__device__ __forceinline__ void split_pack(float x, float y, uint32_t& hi, uint32_t& lo) {
    hi = Pack2<T>::pack(x, y);
    const float2 h = unpack2<T>(hi);
    lo = Pack2<T>::pack(x - h.x, y - h.y);
}

// MT: m16 tiles of query rows a block serves (G · T_q ≤ 16: one; more: MAX_MT and several row tiles).
template <int D, class T, int MT>
__global__ void __launch_bounds__(DecodeTraits<D>::THREADS) softmax_decode_kernel(const DecodeParams p) {
    using Tr = DecodeTraits<D>;
    constexpr int ROWS = 16 * MT, KEYS = Tr::KEYS, STAGES = Tr::STAGES, WARPS = Tr::WARPS, CH = D / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem);                           // [ROWS][D], swizzled
    T* sRing = sQ + ROWS * D;                                     // [WARPS][STAGES][K, V][KEYS][D]
    float* sBias = reinterpret_cast<float*>(sRing + Tr::RING);    // [WARPS][ROWS][KEYS] (forget gate)
    float* sCarry = sBias + WARPS * ROWS * KEYS;                  // [WARPS][ROWS]
    __shared__ float s_ml[WARPS][ROWS][2];
    __shared__ int s_pos[ROWS], s_head[ROWS];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blockIdx.z, kvh = blockIdx.y;
    const int row_tiles = (p.G * p.TQ + ROWS - 1) / ROWS;
    const int split = blockIdx.x / row_tiles, rt = blockIdx.x % row_tiles;
    int Lk = p.cache_seqlens ? int(read_index(p.cache_seqlens, p.lens64, n)) + (p.append ? p.TQ : 0) : p.capacity;
    Lk = min(Lk, p.capacity);  // lengths stay on the device: clamp instead of trusting them
    const int slot = p.cache_batch_idx ? int(read_index(p.cache_batch_idx, p.idx64, n)) : n;
    const int nrows = min(ROWS, p.G * p.TQ - rt * ROWS);
    const bool has_g = p.g_cache != nullptr;
    // Rows sit at positions pos_lo … pos_hi; a window hides every key below pos_lo − window + 1.
    const int pos_lo = Lk - p.TQ, pos_hi = Lk - 1;
    const int k_begin = p.window > 0 ? max(0, pos_lo - p.window + 1) : 0;
    // Splits of whole 64-key warp-quarters over the keys this sequence has (not the capacity), so
    // that a short sequence does not leave most splits empty.
    const int span = max(0, Lk - k_begin);
    const int chunk = ((span + p.splits - 1) / p.splits + WARPS * KEYS - 1) / (WARPS * KEYS) * (WARPS * KEYS);
    const int k_lo = k_begin + split * chunk, k_hi = min(Lk, k_lo + chunk);
    const int w_lo = k_lo + warp * (chunk / WARPS), w_hi = min(k_hi, w_lo + chunk / WARPS);
    const int steps = w_hi > w_lo ? (w_hi - w_lo + KEYS - 1) / KEYS : 0;

    for (int r = threadIdx.x; r < ROWS; r += Tr::THREADS) {
        const int idx = rt * ROWS + min(r, nrows - 1);  // padded rows mirror the last one, never stored
        s_head[r] = kvh * p.G + idx / p.TQ;
        s_pos[r] = pos_lo + idx % p.TQ;
    }
    // Q rows (zeros past nrows: their scores are 0, harmless, and never stored).
    {
        const T* qb = static_cast<const T*>(p.q) + int64_t(n) * p.q_s[0];
        for (int e = threadIdx.x; e < ROWS * CH; e += Tr::THREADS) {
            const int r = e / CH, c = e % CH, idx = rt * ROWS + r;
            const bool ok = r < nrows;
            const T* src = ok ? qb + (idx % p.TQ) * p.q_s[1] + (kvh * p.G + idx / p.TQ) * p.q_s[2] + c * 8 : qb;
            cp_async16(sQ + swz<D>(r, c), src, ok);
        }
        cp_async_commit();
    }

    // Step i of this warp covers keys j0 … j0 + 15, j0 = w_hi − 16 (i + 1); keys below w_lo are
    // zero-filled and masked. Every call commits one group (empty past the end) so that the
    // wait_group counts stay uniform.
    const T* kc = static_cast<const T*>(p.k_cache) + kvh * p.kc_s[2];
    const T* vc = static_cast<const T*>(p.v_cache) + kvh * p.vc_s[2];
    T* ring = sRing + warp * STAGES * Tr::SLOT;
    auto load_step = [&](int i) {
        if (i < steps) {
            T* sk = ring + (i % STAGES) * Tr::SLOT;
            T* sv = sk + KEYS * D;
            const int j0 = w_hi - KEYS * (i + 1);
#pragma unroll
            for (int it = 0; it < KEYS * CH / 32; ++it) {
                const int e = lane + 32 * it, key = e / CH, c = e % CH, j = j0 + key;
                const bool ok = j >= w_lo;
                int64_t page = 0, row = 0;
                if (ok) cache_pos(p, n, slot, j, page, row);
                cp_async16(sk + swz<D>(key, c), kc + page * p.kc_s[0] + row * p.kc_s[1] + c * 8, ok);
                cp_async16(sv + swz<D>(key, c), vc + page * p.vc_s[0] + row * p.vc_s[1] + c * 8, ok);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) load_step(i);
    cp_async_wait<STAGES - 1>();  // the Q group, committed first, has landed
    __syncthreads();

    float* bias = sBias + warp * ROWS * KEYS;
    float* carry = sCarry + warp * ROWS;
    const float* gcache = static_cast<const float*>(p.g_cache);
    if (has_g) {
        // carry[r] = Σ_{s=w_hi..pos_r} g_s of row r's head: the gates between this warp's keys and the row.
        for (int r = 0; r < ROWS; ++r) {
            float c = 0.f;
            for (int s = w_hi + lane; s <= s_pos[r]; s += 32)
                c += gcache[cache_row(p, p.gc_s, n, slot, s) + s_head[r] * p.gc_s[2]];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);
            if (lane == 0) carry[r] = c;
        }
        __syncwarp();
    }

    // Lane rows: m-tile mt, half hf → local row mt · 16 + lane / 4 + 8 hf.
    int pos_l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) pos_l[mt][hf] = s_pos[mt * 16 + lane / 4 + 8 * hf];
    float acc[MT][D / 8][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const int c_lo = 2 * (lane % 4);

    for (int i = 0; i < steps; ++i) {
        cp_async_wait<STAGES - 2>();  // step i's slot has landed for this lane …
        __syncwarp();                 // … and for the whole warp; all lanes are done with step i − 1
        load_step(i + STAGES - 1);    // refill the slot step i − 1 used
        const T* sk = ring + (i % STAGES) * Tr::SLOT;
        const T* sv = sk + KEYS * D;
        const int j0 = w_hi - KEYS * (i + 1);

        if (has_g) {
            // bias[r][c] = Σ_{s=j0+c+1..pos_r} g_s · log2 e: the step's gates (those past pos_r count
            // 0), suffix-summed across each half-warp, on top of the running carry.
            const int c = lane % 16, j = j0 + c;
            float v[ROWS / 2];
#pragma unroll
            for (int k = 0; k < ROWS / 2; ++k) {
                const int r = 2 * k + lane / 16;
                v[k] = j >= w_lo && j <= s_pos[r] ? gcache[cache_row(p, p.gc_s, n, slot, j) + s_head[r] * p.gc_s[2]] : 0.f;
            }
#pragma unroll
            for (int k = 0; k < ROWS / 2; ++k) {
                const int r = 2 * k + lane / 16;
                float x = v[k];
#pragma unroll
                for (int o = 1; o < 16; o <<= 1) {
                    const float y = __shfl_down_sync(0xffffffff, x, o, 16);
                    if (c + o < 16) x += y;
                }
                const float cr = carry[r];
                bias[r * KEYS + c] = (cr + x - v[k]) * kLog2e;
                const float total = __shfl_sync(0xffffffff, x, 0, 16);
                __syncwarp();  // every lane has read carry[r] before lane c = 0 moves it
                if (c == 0) carry[r] = cr + total;
            }
            __syncwarp();
        }

        // S = Q Kᵀ for the 16 keys; each K fragment serves all MT row tiles.
        float s[MT][2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t b[4];
            ldmatrix_x4(b, smem_addr(sk + swz<D>((lane % 8) + (lane / 16) * 8, kk * 2 + (lane / 8) % 2)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t a[4];
                ldmatrix_x4(a, smem_addr(sQ + swz<D>(mt * 16 + lane % 16, kk * 2 + lane / 16)));
                mma16816<T>(s[mt][0], a, b[0], b[1]);
                mma16816<T>(s[mt][1], a, b[2], b[3]);
            }
        }

        // Scale, bias, mask (steps inside every row's visible range skip the mask).
        const bool need_mask = j0 < w_lo || (p.causal && j0 + KEYS - 1 > pos_lo) || (p.window > 0 && j0 <= pos_hi - p.window);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int cl = nb * 8 + c_lo + (e & 1);
                    float x = s[mt][nb][e] * p.scale_log2;
                    if (has_g) x += bias[(mt * 16 + lane / 4 + (e >= 2 ? 8 : 0)) * KEYS + cl];
                    if (need_mask) {
                        const int j = j0 + cl, pos = pos_l[mt][e >> 1];
                        const bool visible = j >= w_lo && (!p.causal || j <= pos) && (p.window <= 0 || j > pos - p.window);
                        if (!visible) x = -INFINITY;
                    }
                    s[mt][nb][e] = x;
                }

        // Online softmax per row (a row lives in one lane quad), then P as hi + lo b16 A fragments.
        uint32_t ph[MT][4], pl[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = fmaxf(m[mt][hf], fmaxf(fmaxf(s[mt][0][2 * hf], s[mt][0][2 * hf + 1]),
                                                  fmaxf(s[mt][1][2 * hf], s[mt][1][2 * hf + 1])));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                // A row with nothing visible yet keeps max −inf; subtracting 0 instead avoids −inf − (−inf).
                const float m_use = mx == -INFINITY ? 0.f : mx;
                const float alpha = fast_exp2(m[mt][hf] - m_use);
                m[mt][hf] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        s[mt][nb][2 * hf + e] = fast_exp2(s[mt][nb][2 * hf + e] - m_use);
                        sum += s[mt][nb][2 * hf + e];
                    }
                l[mt][hf] = l[mt][hf] * alpha + sum;
#pragma unroll
                for (int db = 0; db < D / 8; ++db) {
                    acc[mt][db][2 * hf] *= alpha;
                    acc[mt][db][2 * hf + 1] *= alpha;
                }
            }
            split_pack<T>(s[mt][0][0], s[mt][0][1], ph[mt][0], pl[mt][0]);
            split_pack<T>(s[mt][0][2], s[mt][0][3], ph[mt][1], pl[mt][1]);
            split_pack<T>(s[mt][1][0], s[mt][1][1], ph[mt][2], pl[mt][2]);
            split_pack<T>(s[mt][1][2], s[mt][1][3], ph[mt][3], pl[mt][3]);
        }

        // O += (P_hi + P_lo) V; each V fragment serves all MT row tiles.
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, smem_addr(sv + swz<D>((lane % 8) + ((lane / 8) % 2) * 8, dn * 2 + lane / 16)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816<T>(acc[mt][2 * dn], ph[mt], b[0], b[1]);
                mma16816<T>(acc[mt][2 * dn + 1], ph[mt], b[2], b[3]);
                mma16816<T>(acc[mt][2 * dn], pl[mt], b[0], b[1]);
                mma16816<T>(acc[mt][2 * dn + 1], pl[mt], b[2], b[3]);
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // the rings become the merge buffer

    // Merge the four warps, then write either the final rows or this split's partial.
    float* s_acc = reinterpret_cast<float*>(sRing);  // [WARPS][ROWS][D]
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float ls = l[mt][hf];
            ls += __shfl_xor_sync(0xffffffff, ls, 1);
            ls += __shfl_xor_sync(0xffffffff, ls, 2);
            const int r = mt * 16 + lane / 4 + 8 * hf;
            if (lane % 4 == 0) {
                s_ml[warp][r][0] = m[mt][hf];
                s_ml[warp][r][1] = ls;
            }
            float* dst = s_acc + (warp * ROWS + r) * D + c_lo;
#pragma unroll
            for (int db = 0; db < D / 8; ++db)
                *reinterpret_cast<float2*>(dst + db * 8) = make_float2(acc[mt][db][2 * hf], acc[mt][db][2 * hf + 1]);
        }
    __syncthreads();
    for (int e = threadIdx.x; e < nrows * D; e += blockDim.x) {
        const int r = e / D, d = e % D;
        float M = -INFINITY;
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, s_ml[w][r][0]);
        const float Mu = M == -INFINITY ? 0.f : M;
        float L = 0.f, A = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            const float f = fast_exp2(s_ml[w][r][0] - Mu);
            L += s_ml[w][r][1] * f;
            A += s_acc[(w * ROWS + r) * D + d] * f;
        }
        const int idx = rt * ROWS + r, gi = idx / p.TQ, t = idx % p.TQ, h = kvh * p.G + gi;
        if (p.splits == 1) {
            float o = L > 0.f ? A / L : 0.f;
            if (p.gate)
                o *= 1.f / (1.f + __expf(-load_any(p.gate, n * p.gate_s[0] + t * p.gate_s[1] + h * p.gate_s[2] + d,
                                                   p.gate_dtype)));
            store_any(p.o, n * p.o_s[0] + t * p.o_s[1] + h * p.o_s[2] + d, p.o_dtype, o);
            if (d == 0 && p.lse)
                p.lse[n * p.lse_s[0] + h * p.lse_s[1] + t * p.lse_s[2]] = L > 0.f ? M * kLn2 + logf(L) : -INFINITY;
        } else {
            const int64_t part = ((int64_t(n) * p.HQ + h) * p.TQ + t) * p.splits + split;
            p.part_o[part * D + d] = A;
            if (d == 0) {
                p.part_ml[part * 2] = M;
                p.part_ml[part * 2 + 1] = L;
            }
        }
    }
}

// One block per (sequence, head, token): o = Σ_s A_s 2^(M_s − M) / Σ_s L_s 2^(M_s − M).
template <int D>
__global__ void softmax_decode_combine_kernel(const DecodeParams p) {
    const int row = blockIdx.x;  // (n · HQ + h) · TQ + t
    const int t = row % p.TQ, h = (row / p.TQ) % p.HQ, n = row / (p.TQ * p.HQ);
    const int64_t base = int64_t(row) * p.splits;
    float M = -INFINITY;
    for (int s = 0; s < p.splits; ++s) M = fmaxf(M, p.part_ml[(base + s) * 2]);
    const float Mu = M == -INFINITY ? 0.f : M;
    float L = 0.f;
    for (int s = 0; s < p.splits; ++s) L += p.part_ml[(base + s) * 2 + 1] * fast_exp2(p.part_ml[(base + s) * 2] - Mu);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float A = 0.f;
        for (int s = 0; s < p.splits; ++s) A += p.part_o[(base + s) * D + d] * fast_exp2(p.part_ml[(base + s) * 2] - Mu);
        float o = L > 0.f ? A / L : 0.f;
        if (p.gate)
            o *= 1.f / (1.f + __expf(-load_any(p.gate, n * p.gate_s[0] + t * p.gate_s[1] + h * p.gate_s[2] + d,
                                               p.gate_dtype)));
        store_any(p.o, n * p.o_s[0] + t * p.o_s[1] + h * p.o_s[2] + d, p.o_dtype, o);
    }
    if (threadIdx.x == 0 && p.lse)
        p.lse[n * p.lse_s[0] + h * p.lse_s[1] + t * p.lse_s[2]] = L > 0.f ? M * kLn2 + logf(L) : -INFINITY;
}

}  // namespace hla::softmax::cuda
