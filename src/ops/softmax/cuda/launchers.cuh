// hla — the softmax family's kernel launchers, one explicit instantiation file per head dim
// (softmax_d64.cu, softmax_d128.cu, softmax_d256.cu) so that the heavy templates build in parallel.
#pragma once

#include "core/checks.hpp"
#include "ops/softmax/cuda/backward.cuh"
#include "ops/softmax/cuda/decode.cuh"
#include "ops/softmax/cuda/forward.cuh"

namespace hla::softmax::cuda {

inline void check(cudaError_t e, const char* op, const char* what) {
    HLA_CHECK(e == cudaSuccess, op, ": CUDA error in ", what, ": ", cudaGetErrorString(e));
}


template <int D>
void launch_forward_d(const FwdParams& fp, bool bf16, int m_blocks, int heads, int seqs, const char* op);
template <int D>
void launch_backward_d(const BwdParams& bp, bool bf16, int n_blocks, int kv_heads, int seqs, const char* op);
template <int D>
void launch_decode_d(const DecodeParams& dp, bool bf16, const char* op);

// Query rows one decode block serves: the G · T_q rows of a kv head, rounded up to 1, 2, 4 or the most
// a block holds (8, or 4 at D = 256); more rows take several row tiles.
inline int decode_rows_per_block(int D, int rows) {
    const int max_rows = D == 256 ? 4 : 8;
    return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : max_rows;
}

#ifdef HLA_SOFTMAX_INSTANTIATE
template <int D>
void launch_forward_d(const FwdParams& fp, bool bf16, int m_blocks, int heads, int seqs, const char* op) {
    using Tr = FwdTraits<D>;
    const dim3 grid(m_blocks, heads, seqs);
    if (bf16) {
        auto kernel = softmax_fwd_kernel<D, __nv_bfloat16>;
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM), op, "smem attribute");
        kernel<<<grid, Tr::THREADS, Tr::SMEM>>>(fp);
    } else {
        auto kernel = softmax_fwd_kernel<D, __half>;
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM), op, "smem attribute");
        kernel<<<grid, Tr::THREADS, Tr::SMEM>>>(fp);
    }
    check(cudaGetLastError(), op, "forward launch");
}

template <int D>
void launch_backward_d(const BwdParams& bp, bool bf16, int n_blocks, int kv_heads, int seqs, const char* op) {
    using Tr = BwdTraits<D>;
    const dim3 grid(n_blocks, kv_heads, seqs);
    if (bf16) {
        auto kernel = softmax_bwd_kernel<D, __nv_bfloat16>;
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM), op, "smem attribute");
        kernel<<<grid, Tr::THREADS, Tr::SMEM>>>(bp);
    } else {
        auto kernel = softmax_bwd_kernel<D, __half>;
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::SMEM), op, "smem attribute");
        kernel<<<grid, Tr::THREADS, Tr::SMEM>>>(bp);
    }
    check(cudaGetLastError(), op, "backward launch");
}

template <int D, int ROWS>
void launch_decode_rows(const DecodeParams& dp, bool bf16, const char* op) {
    const int row_tiles = (dp.G * dp.TQ + ROWS - 1) / ROWS;
    const dim3 grid(unsigned(dp.splits * row_tiles), unsigned(dp.HKV), unsigned(dp.N));
    if (bf16)
        softmax_decode_kernel<D, __nv_bfloat16, ROWS><<<grid, 128>>>(dp);
    else
        softmax_decode_kernel<D, __half, ROWS><<<grid, 128>>>(dp);
    check(cudaGetLastError(), op, "decode launch");
}

template <int D>
void launch_decode_d(const DecodeParams& dp, bool bf16, const char* op) {
    const int rows = decode_rows_per_block(D, dp.G * dp.TQ);
    if (rows == 1)
        launch_decode_rows<D, 1>(dp, bf16, op);
    else if (rows == 2)
        launch_decode_rows<D, 2>(dp, bf16, op);
    else if (rows == 4)
        launch_decode_rows<D, 4>(dp, bf16, op);
    else
        launch_decode_rows<D, DecodeTraits<D>::MAX_ROWS>(dp, bf16, op);
    if (dp.splits > 1) {
        softmax_decode_combine_kernel<D><<<unsigned(dp.N * dp.HQ * dp.TQ), D>>>(dp);
        check(cudaGetLastError(), op, "decode combine launch");
    }
}

template void launch_forward_d<HLA_SOFTMAX_INSTANTIATE>(const FwdParams&, bool, int, int, int, const char*);
template void launch_backward_d<HLA_SOFTMAX_INSTANTIATE>(const BwdParams&, bool, int, int, int, const char*);
template void launch_decode_d<HLA_SOFTMAX_INSTANTIATE>(const DecodeParams&, bool, const char*);
#endif

}  // namespace hla::softmax::cuda
