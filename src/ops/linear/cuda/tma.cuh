// hla — Hopper's tensor memory accelerator (TMA, sm_90): tiles copied global → shared by the copy
// engine, completing on an mbarrier, and the tensor maps that describe them (host side).
//
// One thread issues a whole tile (a 2-D or 4-D box of a tensor map, landing in shared memory in the
// map's swizzle — wgmma.cuh's Swz layout when the swizzle width equals a block row) or a contiguous run
// of bytes (bulk copy); the copies count their bytes against the mbarrier's expected transaction
// count, and a thread that sees the barrier's phase complete sees the data. Against cp.async, the
// copies take no issue slots from the threads that compute: the scan's output warps spent ~1700 of
// ~3900 cycles a chunk issuing 16-byte copies and waiting for prepare before their first product
// (clock64 trace of session 9's chunk_scan_ws_kernel, GDN B=1 T=16384, H100; results file, session 10).
#pragma once

#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's types (the function comes from the runtime)
#include <cuda_runtime.h>

#include <cstdint>

#include "hla/error.hpp"

namespace hla::linear::cuda::tma {

__device__ __forceinline__ uint32_t saddr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// An mbarrier in shared memory: init by one thread (then fence_init and a block barrier before use).
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(saddr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// One arrival that also expects `bytes` more of transactions in the current phase.
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(saddr(bar)), "r"(bytes) : "memory");
}
// One arrival.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(saddr(bar)) : "memory");
}
// A consumer thread done with a stage: one arrival each. (One arrival a warp after __syncwarp orders
// the same reads in the PTX model, but compute-sanitizer's racecheck did not follow it: it reported
// every refill of a stage, the copy engine's writes or the forming warps' zeroed rows, against the
// other lanes' reads of the chunk before.)
__device__ __forceinline__ void release_stage(uint64_t* empty) { mbar_arrive(empty); }
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(saddr(bar)),
        "r"(parity)
        : "memory");
}
// Orders this thread's earlier generic-proxy accesses of global memory (an acquire of another kernel's
// flag) before its later copy-engine reads.
__device__ __forceinline__ void fence_proxy_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// Box (c0, c1) of a 2-D map / (c0, …, c3) of a 4-D one (element coordinates, innermost first) into dst.
__device__ __forceinline__ void load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            saddr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(saddr(bar))
        : "memory");
}
__device__ __forceinline__ void load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                        uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];" ::"r"(saddr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(saddr(bar))
        : "memory");
}
// `bytes` contiguous bytes (a multiple of 16, both ends 16-byte aligned).
__device__ __forceinline__ void load_bytes(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     saddr(dst)),
                 "l"(src), "r"(bytes), "r"(saddr(bar))
                 : "memory");
}

// ---- host: tensor maps -------------------------------------------------------------------------

// The swizzle of a box whose inner dimension is `row_bytes` (32, 64 or 128) wide: wgmma.cuh's Swz.
inline CUtensorMapSwizzle swizzle_for(int row_bytes) {
    return row_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
           : row_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                             : CU_TENSOR_MAP_SWIZZLE_32B;
}

// A tensor map of `rank` dimensions of `type` (innermost first: sizes in elements, the outer
// dimensions' strides in bytes, multiples of 16) read in boxes of `box` elements, landing in shared
// memory in `swizzle`; out-of-bounds elements read as zero. The driver's encoder comes through the
// runtime (no -lcuda).
inline void encode(CUtensorMap* map, CUtensorMapDataType type, const void* base, int rank, const uint64_t* dims,
                   const uint64_t* strides, const uint32_t* box, CUtensorMapSwizzle swizzle, const char* op,
                   const char* what = "an operand") {
    using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
    static Encode encode_tiled = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
                cudaSuccess ||
            found != cudaDriverEntryPointSuccess)
            fn = nullptr;
        return reinterpret_cast<Encode>(fn);
    }();
    HLA_CHECK(encode_tiled != nullptr, op,
              ": the CUDA driver has no cuTensorMapEncodeTiled (TMA needs driver 12.0 or newer)");
    cuuint64_t d[5], s[4];
    cuuint32_t b[5], e[5];
    for (int i = 0; i < rank; ++i) {
        d[i] = dims[i];
        b[i] = box[i];
        e[i] = 1;
        if (i + 1 < rank) s[i] = strides[i];
    }
    const CUresult r = encode_tiled(map, type, cuuint32_t(rank), const_cast<void*>(base), d, s, b, e,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    HLA_CHECK(r == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed for ", what, " (error ", int(r), ")");
}

// A bf16 map whose boxes land swizzled for their box[0]·2-byte rows (wgmma.cuh's Swz).
inline void encode_bf16(CUtensorMap* map, const void* base, int rank, const uint64_t* dims, const uint64_t* strides,
                        const uint32_t* box, const char* op) {
    encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, rank, dims, strides, box, swizzle_for(int(box[0]) * 2), op);
}

}  // namespace hla::linear::cuda::tma
