// hla — the softmax family's kernel launchers, one explicit instantiation file per head dim
// (softmax_d64.cu, softmax_d128.cu, softmax_d256.cu) so that the heavy templates build in parallel.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "core/checks.hpp"
#include "core/cuda/smem_limit.cuh"
#include "ops/softmax/cuda/backward.cuh"
#include "ops/softmax/cuda/decode.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

inline void check(cudaError_t e, const char* op, const char* what) {
    HLA_CHECK(e == cudaSuccess, op, ": CUDA error in ", what, ": ", cudaGetErrorString(e));
}


using ::hla::detail::raise_smem_limit;

// `device`: the current device (the launch goes there), whose shared-memory limits are raised.
template <int D>
void launch_forward_d(const FwdParams& fp, bool bf16, int m_blocks, int heads, int seqs, int device, const char* op);
template <int D>
void launch_backward_d(const BwdParams& bp, bool bf16, int n_blocks, int kv_heads, int seqs, int device, const char* op);
template <int D>
void launch_decode_d(const DecodeParams& dp, bool bf16, int device, const char* op);

// m16 row tiles one decode block serves: one for up to 16 query rows (G · T_q), else the most a block
// holds (2, or 1 at D = 256) and several row tiles.
inline int decode_row_tiles_per_block(int D, int rows) { return rows <= 16 || D == 256 ? 1 : 2; }

// Decode blocks resident per SM for these query rows and options (the occupancy calculator's answer
// for the kernel that will run); the split heuristic sizes its waves with it.
template <int D>
int decode_blocks_per_sm(int rows, bool gates, bool bf16, int device, const char* op);

#ifdef HLA_SOFTMAX_INSTANTIATE
// Kernel<<<grid, threads, smem>>>(params) on the current stream, its shared-memory limit raised to
// `smem` first (once per device).
template <auto Kernel, class P>
void launch_with_smem(dim3 grid, int threads, int smem, const P& params, int device, const char* op, const char* what) {
    raise_smem_limit<Kernel>(smem, device, op, "smem attribute");
    Kernel<<<grid, threads, smem, launch_stream()>>>(params);
    check(cudaGetLastError(), op, what);
}

// f(type, flag) for the kernel variant a launch needs: type a std::type_identity of the 16-bit input
// type (bf16 or half), flag a std::bool_constant; the 2 × 2 choice of every launch in one place.
template <class F>
void with_variant(bool bf16, bool flag, F&& f) {
    if (bf16) {
        if (flag) f(std::type_identity<__nv_bfloat16>{}, std::true_type{});
        else f(std::type_identity<__nv_bfloat16>{}, std::false_type{});
    } else {
        if (flag) f(std::type_identity<__half>{}, std::true_type{});
        else f(std::type_identity<__half>{}, std::false_type{});
    }
}

template <int D>
void launch_forward_d(const FwdParams& fp, bool bf16, int m_blocks, int heads, int seqs, int device, const char* op) {
    using Tr = FwdTraits<D>;
    const dim3 grid(m_blocks, heads, seqs);
    const bool fast = fp.g == nullptr && fp.scale_log2 > 0.f;
    with_variant(bf16, fast, [&](auto type, auto fast_c) {
        using T = typename decltype(type)::type;
        launch_with_smem<softmax_fwd_kernel<D, T, decltype(fast_c)::value>>(grid, Tr::THREADS, Tr::SMEM, fp, device, op,
                                                                           "forward launch");
    });
}

template <int D>
void launch_backward_d(const BwdParams& bp, bool bf16, int n_blocks, int kv_heads, int seqs, int device, const char* op) {
    using Tr = BwdTraits<D>;
    const dim3 grid(kv_heads, seqs, n_blocks);  // key blocks slowest: see the kernel
    with_variant(bf16, bp.f.g != nullptr, [&](auto type, auto gated) {
        using T = typename decltype(type)::type;
        launch_with_smem<softmax_bwd_kernel<D, T, decltype(gated)::value>>(grid, Tr::THREADS, Tr::SMEM, bp, device, op,
                                                                          "backward launch");
    });
}

// The decode kernel for (D, T, MT) with its dynamic shared-memory limit raised (once per device) to
// the largest size it takes (with forget gates).
template <int D, class T, int MT>
auto decode_kernel(int device, const char* op) {
    raise_smem_limit<softmax_decode_kernel<D, T, MT>>(DecodeTraits<D>::smem(MT, true), device, op, "decode smem attribute");
    return softmax_decode_kernel<D, T, MT>;
}

template <int D, int MT>
void launch_decode_mt(const DecodeParams& dp, bool bf16, int device, const char* op) {
    using Tr = DecodeTraits<D>;
    const int row_tiles = (dp.G * dp.TQ + 16 * MT - 1) / (16 * MT);
    const dim3 grid(unsigned(dp.splits * row_tiles), unsigned(dp.HKV), unsigned(dp.N));
    const int smem = Tr::smem(MT, dp.g_cache != nullptr);
    if (bf16)
        decode_kernel<D, __nv_bfloat16, MT>(device, op)<<<grid, Tr::THREADS, smem, launch_stream()>>>(dp);
    else
        decode_kernel<D, __half, MT>(device, op)<<<grid, Tr::THREADS, smem, launch_stream()>>>(dp);
    check(cudaGetLastError(), op, "decode launch");
}

template <int D>
int decode_blocks_per_sm(int rows, bool gates, bool bf16, int device, const char* op) {
    using Tr = DecodeTraits<D>;
    const int mt = decode_row_tiles_per_block(D, rows);
    // Per (row tiles, gates, dtype) the occupancy query, a host call, is answered once per process.
    static std::atomic<int> cached[2][2][2] = {};
    std::atomic<int>& c = cached[mt - 1][gates][bf16];
    int blocks = c.load(std::memory_order_relaxed);
    if (blocks > 0) return blocks;
    const int smem = Tr::smem(mt, gates);
    cudaError_t e;
    if (mt == 1)
        e = bf16 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<D, __nv_bfloat16, 1>(device, op), Tr::THREADS, smem)
                 : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<D, __half, 1>(device, op), Tr::THREADS, smem);
    else
        e = bf16 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<D, __nv_bfloat16, Tr::MAX_MT>(device, op),
                                                                 Tr::THREADS, smem)
                 : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_kernel<D, __half, Tr::MAX_MT>(device, op), Tr::THREADS, smem);
    check(e, op, "decode occupancy query");
    blocks = std::max(blocks, 1);
    c.store(blocks, std::memory_order_relaxed);
    return blocks;
}

template <int D>
void launch_decode_d(const DecodeParams& dp, bool bf16, int device, const char* op) {
    if (decode_row_tiles_per_block(D, dp.G * dp.TQ) == 1)
        launch_decode_mt<D, 1>(dp, bf16, device, op);
    else
        launch_decode_mt<D, DecodeTraits<D>::MAX_MT>(dp, bf16, device, op);
    if (dp.splits > 1) {
        softmax_decode_combine_kernel<D><<<unsigned(dp.N * dp.HQ * dp.TQ), D, 0, launch_stream()>>>(dp);
        check(cudaGetLastError(), op, "decode combine launch");
    }
}

template void launch_forward_d<HLA_SOFTMAX_INSTANTIATE>(const FwdParams&, bool, int, int, int, int, const char*);
template void launch_backward_d<HLA_SOFTMAX_INSTANTIATE>(const BwdParams&, bool, int, int, int, int, const char*);
template void launch_decode_d<HLA_SOFTMAX_INSTANTIATE>(const DecodeParams&, bool, int, const char*);
template int decode_blocks_per_sm<HLA_SOFTMAX_INSTANTIATE>(int, bool, bool, int, const char*);
#endif

}  // namespace hla::softmax::cuda
