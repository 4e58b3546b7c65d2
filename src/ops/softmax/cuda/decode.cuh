// hla — KV-cache attention on CUDA (decode, small T_q, chunked prefill): split-KV, one warp per key.
//
// Decode is a matrix-vector product per head: it reads every cached key and value once and does two
// flops per byte, so it is bound by memory bandwidth, not by the tensor cores. A block owns one
// (sequence, kv head, key split) and up to ROWS query rows of that kv head (its G query heads × T_q
// tokens), so a K/V row read from memory serves every query head that shares it. Each of the 4 warps
// walks a contiguous quarter of the split downwards (the forget-gate suffix sum is then a running
// sum), four keys at a time so that eight 16-byte loads are in flight per lane before the first use.
// Splits are merged by a second kernel with the usual log-sum-exp rescaling.
#pragma once

#include "ops/softmax/cuda/common.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

template <int D>
struct DecodeTraits {
    static constexpr int MAX_ROWS = D == 256 ? 4 : 8;  // query rows per block (registers: ROWS × D/32 × 2)
    static constexpr int DPL = D / 32;                 // channels per lane
    static constexpr int WARPS = 4;
    // Keys per step: 2 × UNROLL row loads in flight per lane before the first use (8 × 8 B at D = 128).
    static constexpr int UNROLL = D == 256 ? 4 : 8;
};

// Cache element offset of token j of sequence n (head 0, channel 0) for the k/v strides `s`.
__device__ __forceinline__ int64_t cache_row(const DecodeParams& p, const int64_t* s, int n, int slot, int j) {
    if (p.block_table) {
        const int page = p.block_table[n * p.bt_s0 + j / p.page_size];
        return page * s[0] + (j % p.page_size) * s[1];
    }
    return slot * s[0] + int64_t(j) * s[1];
}

template <int DPL, class T>
__device__ __forceinline__ void load_lane(float (&dst)[DPL], const T* src) {
    // DPL b16 values: 4, 8 or 16 bytes in one access.
    if constexpr (DPL == 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(src);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i] = float(e[i]);
    } else if constexpr (DPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(src);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = float(e[i]);
    } else {
        const uint32_t u = *reinterpret_cast<const uint32_t*>(src);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 2; ++i) dst[i] = float(e[i]);
    }
}

// The same access kept packed (two b16 per register): the K/V rows in flight then cost half the
// registers, which buys resident warps, which is what a bandwidth-bound loop needs.
template <int DPL>
__device__ __forceinline__ void load_lane_raw(uint32_t (&dst)[DPL / 2], const void* src) {
    if constexpr (DPL == 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(src);
        dst[0] = u.x, dst[1] = u.y, dst[2] = u.z, dst[3] = u.w;
    } else if constexpr (DPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(src);
        dst[0] = u.x, dst[1] = u.y;
    } else {
        dst[0] = *reinterpret_cast<const uint32_t*>(src);
    }
}

template <class T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

// ROWS: query rows a block serves (G · T_q rounded up to 1, 2, 4 or MAX_ROWS), a compile-time count
// so that the per-row registers exist only for rows that are there.
template <int D, class T, int ROWS>
__global__ void __launch_bounds__(128) softmax_decode_kernel(const DecodeParams p) {
    using Tr = DecodeTraits<D>;
    constexpr int DPL = Tr::DPL, U = Tr::UNROLL;
    __shared__ float s_ml[Tr::WARPS][ROWS][2];
    __shared__ float s_acc[Tr::WARPS][ROWS][D];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blockIdx.z, kvh = blockIdx.y;
    const int row_tiles = (p.G * p.TQ + ROWS - 1) / ROWS;
    const int split = blockIdx.x / row_tiles, rt = blockIdx.x % row_tiles;
    int Lk = p.cache_seqlens ? int(read_index(p.cache_seqlens, p.lens64, n)) + (p.append ? p.TQ : 0) : p.capacity;
    Lk = min(Lk, p.capacity);  // lengths stay on the device: clamp instead of trusting them
    const int slot = p.cache_batch_idx ? int(read_index(p.cache_batch_idx, p.idx64, n)) : n;
    const int chunk = (p.capacity + p.splits - 1) / p.splits;
    const int k_lo = split * chunk, k_hi = min(Lk, k_lo + chunk);
    const int span = max(0, k_hi - k_lo);
    const int sub = (span + Tr::WARPS - 1) / Tr::WARPS;
    const int w_lo = k_lo + warp * sub, w_hi = min(k_hi, w_lo + sub);
    const int nrows = min(ROWS, p.G * p.TQ - rt * ROWS);
    const bool has_g = p.g_cache != nullptr;

    float q[ROWS][DPL], acc[ROWS][DPL], m[ROWS], l[ROWS], run[ROWS];
    int pos[ROWS], hh[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int idx = rt * ROWS + min(r, nrows - 1);  // rows past nrows mirror the last one, never stored
        const int gi = idx / p.TQ, t = idx % p.TQ;
        hh[r] = kvh * p.G + gi;
        pos[r] = Lk - p.TQ + t;
        float qf[DPL];
        load_lane<DPL>(qf, static_cast<const T*>(p.q) + n * p.q_s[0] + t * p.q_s[1] + hh[r] * p.q_s[2] + lane * DPL);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            q[r][i] = qf[i] * p.scale_log2;
            acc[r][i] = 0.f;
        }
        m[r] = -INFINITY;
        l[r] = 0.f;
        run[r] = 0.f;
        if (has_g) {
            // Σ_{s=w_hi..pos} g_s: the gates between this warp's keys and the query.
            float c = 0.f;
            for (int s = w_hi + lane; s <= pos[r] && s < Lk; s += 32)
                c += static_cast<const float*>(p.g_cache)[cache_row(p, p.gc_s, n, slot, s) + hh[r] * p.gc_s[2]];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffff, c, o);
            run[r] = c;
        }
    }

    const T* kc = static_cast<const T*>(p.k_cache) + kvh * p.kc_s[2] + lane * DPL;
    const T* vc = static_cast<const T*>(p.v_cache) + kvh * p.vc_s[2] + lane * DPL;
    for (int jb = w_hi - 1; jb >= w_lo; jb -= U) {
        uint32_t kr[U][DPL / 2], vr[U][DPL / 2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = max(jb - u, w_lo);  // out-of-range keys reload a valid row and are masked below
            load_lane_raw<DPL>(kr[u], kc + cache_row(p, p.kc_s, n, slot, j));
            load_lane_raw<DPL>(vr[u], vc + cache_row(p, p.vc_s, n, slot, j));
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (r >= nrows) break;
            float sc[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < DPL / 2; ++i) {
                    const float2 kv = unpack2<T>(kr[u][i]);
                    d += q[r][2 * i] * kv.x + q[r][2 * i + 1] * kv.y;
                }
                sc[u] = d;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                for (int u = 0; u < U; ++u) sc[u] += __shfl_xor_sync(0xffffffff, sc[u], o);
            float mx = m[r];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int j = jb - u;
                const bool in = j >= w_lo;
                const bool visible = in && (!p.causal || j <= pos[r]) && (p.window <= 0 || j > pos[r] - p.window);
                if (has_g) {
                    sc[u] += run[r] * kLog2e;
                    if (in && j <= pos[r]) run[r] += static_cast<const float*>(p.g_cache)[cache_row(p, p.gc_s, n, slot, j) + hh[r] * p.gc_s[2]];
                }
                sc[u] = visible ? sc[u] : -INFINITY;
                mx = fmaxf(mx, sc[u]);
            }
            const float m_use = mx == -INFINITY ? 0.f : mx;
            const float alpha = fast_exp2(m[r] - m_use);
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                sc[u] = fast_exp2(sc[u] - m_use);
                sum += sc[u];
            }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int i = 0; i < DPL / 2; ++i) {
                float a0 = acc[r][2 * i] * alpha, a1 = acc[r][2 * i + 1] * alpha;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const float2 vv = unpack2<T>(vr[u][i]);
                    a0 += sc[u] * vv.x;
                    a1 += sc[u] * vv.y;
                }
                acc[r][2 * i] = a0;
                acc[r][2 * i + 1] = a1;
            }
        }
    }

    // Merge the four warps, then write either the final rows or this split's partial.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (lane == 0) {
            s_ml[warp][r][0] = m[r];
            s_ml[warp][r][1] = l[r];
        }
#pragma unroll
        for (int i = 0; i < DPL; ++i) s_acc[warp][r][lane * DPL + i] = acc[r][i];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nrows * D; e += blockDim.x) {
        const int r = e / D, d = e % D;
        float M = -INFINITY;
        for (int w = 0; w < Tr::WARPS; ++w) M = fmaxf(M, s_ml[w][r][0]);
        const float Mu = M == -INFINITY ? 0.f : M;
        float L = 0.f, A = 0.f;
        for (int w = 0; w < Tr::WARPS; ++w) {
            const float f = fast_exp2(s_ml[w][r][0] - Mu);
            L += s_ml[w][r][1] * f;
            A += s_acc[w][r][d] * f;
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
