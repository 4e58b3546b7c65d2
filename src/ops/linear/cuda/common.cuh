// hla — CUDA building blocks of the linear family: element types, loads and stores of any dtype, and
// warp-level matrix products on tensor cores (mma.sync) over tiles in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "core/cuda/smem_limit.cuh"
#include "core/cuda/stream.cuh"
#include "hla/dtype.hpp"
#include "hla/error.hpp"
#include "hla/tensor.hpp"
#include "ops/linear/activations.hpp"

// The input dtypes whose chunked kernels this build compiles: CMake's HLA_CUDA_LINEAR_DTYPES defines
// each switch as 0 or 1 (CMakeLists.txt, hla_cuda_variants); a file compiled without CMake gets all.
// Every call into a dtype-specific kernel sits behind the same switch as its instantiation
// (scripts/check-cuda-variants.sh links single-dtype builds to check it).
#ifndef HLA_CUDA_LINEAR_BF16
#define HLA_CUDA_LINEAR_BF16 1
#endif
#ifndef HLA_CUDA_LINEAR_F16
#define HLA_CUDA_LINEAR_F16 1
#endif
#ifndef HLA_CUDA_LINEAR_F32
#define HLA_CUDA_LINEAR_F32 1
#endif

namespace hla::linear::cuda {

using hla::detail::raise_smem_limit;  // > 48 KiB of dynamic shared memory, once per device (core/cuda/smem_limit.cuh)
using hla::detail::launch_stream;  // the stream of every launch (core/cuda/stream.cuh)

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
    HLA_CHECK(err == cudaSuccess, op, ": CUDA error in ", what, ": ", cudaGetErrorString(err));
}

// ---- scalar loads and stores of a run-time dtype (gates, β, outputs: not on the hot path) ----------

__device__ __forceinline__ float load_any(const void* p, DType t, int64_t i) {
    switch (t) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
        case DType::F64: return float(static_cast<const double*>(p)[i]);
        case DType::I32: return float(static_cast<const int32_t*>(p)[i]);
        case DType::I64: return float(static_cast<const int64_t*>(p)[i]);
    }
    return 0.f;
}

__device__ __forceinline__ void store_any(void* p, DType t, int64_t i, float x) {
    switch (t) {
        case DType::F32: static_cast<float*>(p)[i] = x; break;
        case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(x); break;
        case DType::F16: static_cast<__half*>(p)[i] = __float2half(x); break;
        case DType::F64: static_cast<double*>(p)[i] = double(x); break;
        default: break;
    }
}

__device__ __forceinline__ int64_t load_index(const void* p, DType t, int64_t i) {
    return t == DType::I64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

// x added to the compensated sum hi + lo (Knuth's two-sum: lo collects what each rounding of hi
// drops), so a large term followed by small ones loses nothing: fp64's accuracy for the gate sums of
// vector decay without fp64's conversions on every element. Needs finite terms (−inf − −inf is NaN).
__device__ __forceinline__ void compensated_add(float& hi, float& lo, float x) {
    const float t = hi + x, z = t - hi;
    lo += (hi - (t - z)) + (x - z);
    hi = t;
}

// ---- the compile-time element type E of q/k/v and of the intermediates ----------------------------

template <class E>
__device__ __forceinline__ float to_f(E x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <class E>
__device__ __forceinline__ E from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <class E>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::F32; }
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::BF16; }
template <>
constexpr DType dtype_of<__half>() { return DType::F16; }

// Element j of a 16-byte vector of In held as four 32-bit words (little-endian halves).
template <class In>
__device__ __forceinline__ float unpack_elem(const uint32_t (&w)[4], int j) {
    if constexpr (sizeof(In) == 4) {
        return __uint_as_float(w[j]);
    } else {
        const uint32_t word = w[j >> 1];
        const unsigned short bits = (j & 1) ? (word >> 16) : (word & 0xffffu);
        if constexpr (std::is_same_v<In, __nv_bfloat16>) return __uint_as_float(uint32_t(bits) << 16);
        else return __half2float(__ushort_as_half(bits));
    }
}

// The sum of x over each group of N consecutive lanes (N a power of two ≤ 32, the groups aligned to
// N), in every lane of the group: log2(N) butterfly shuffles. The whole warp must take part.
template <int N>
__device__ __forceinline__ float lane_group_sum(float x) {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "lane_group_sum: N a power of two <= 32");
#pragma unroll
    for (int off = N / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// Adds the squares of the eight bf16 of 16-byte pieces qa and ka to sq and sk (and, with kDot, their
// products to sqk): the per-lane part of the q/k row norms.
template <bool kDot = false>
__device__ __forceinline__ void add_piece_squares(uint4 qa, uint4 ka, float& sq, float& sk, float& sqk) {
    const uint32_t qw[4] = {qa.x, qa.y, qa.z, qa.w}, kw[4] = {ka.x, ka.y, ka.z, ka.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float a = unpack_elem<__nv_bfloat16>(qw, e), b = unpack_elem<__nv_bfloat16>(kw, e);
        sq += a * a;
        sk += b * b;
        if constexpr (kDot) sqk += a * b;
    }
}

// ---- tile loads -------------------------------------------------------------------------------

// dst[r · ld + c] = float(src[r · row_stride + c]) for r < valid rows (zero for r ≥ valid), c < COLS,
// ROWS × COLS spread over THREADS threads. Every load of a thread is issued before any is used: the
// rows of a chunk are independent global reads, and a load-convert-store loop would wait out one
// memory latency per element. 16-byte loads when the rows allow them.
template <class In, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows(float* dst, int ld, const In* src, int64_t row_stride, int valid) {
    constexpr int VEC = 16 / sizeof(In);
    static_assert(ROWS * COLS % (VEC * THREADS) == 0, "load_rows: the tile must split evenly into 16-byte pieces");
    constexpr int NV = ROWS * COLS / VEC / THREADS;
    const bool vec_ok = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && (row_stride % VEC == 0);
    if (vec_ok) {
        uint4 r[NV];
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const int v = threadIdx.x + i * THREADS;
            const int row = v / (COLS / VEC), cv = v % (COLS / VEC);
            r[i] = row < valid ? *reinterpret_cast<const uint4*>(src + row * row_stride + cv * VEC) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < NV; ++i) {
            const int v = threadIdx.x + i * THREADS;
            const int row = v / (COLS / VEC), cv = v % (COLS / VEC);
            const uint32_t w[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
#pragma unroll
            for (int j = 0; j < VEC; ++j) dst[row * ld + cv * VEC + j] = unpack_elem<In>(w, j);
        }
    } else {
        constexpr int NE = ROWS * COLS / THREADS;
        float r[NE];
#pragma unroll
        for (int i = 0; i < NE; ++i) {
            const int e = threadIdx.x + i * THREADS;
            const int row = e / COLS, c = e % COLS;
            r[i] = row < valid ? to_f(src[row * row_stride + c]) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < NE; ++i) {
            const int e = threadIdx.x + i * THREADS;
            dst[(e / COLS) * ld + e % COLS] = r[i];
        }
    }
}

// load_rows for a tensor whose dtype is known only at run time (the gate may come in any float dtype
// whatever the q/k/v dtype is): `offset` elements into `src`.
template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows_any(float* dst, int ld, const void* src, DType dtype, int64_t offset,
                                              int64_t row_stride, int valid) {
    switch (dtype) {
        case DType::BF16:
            load_rows<__nv_bfloat16, ROWS, COLS, THREADS>(dst, ld, static_cast<const __nv_bfloat16*>(src) + offset,
                                                          row_stride, valid);
            break;
        case DType::F16:
            load_rows<__half, ROWS, COLS, THREADS>(dst, ld, static_cast<const __half*>(src) + offset, row_stride, valid);
            break;
        default:
            load_rows<float, ROWS, COLS, THREADS>(dst, ld, static_cast<const float*>(src) + offset, row_stride, valid);
            break;
    }
}

// 16-byte asynchronous copy global → shared (Ampere+), and its group fences.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most N of this thread's most recent commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait_group<0>(); }

// A flag one kernel's block raises once all of its threads' global writes are done, and another
// kernel's threads wait for before reading them (concurrent kernels, not stream order). Every thread
// fences its own writes, the barrier orders them before the store, which releases at GPU scope;
// each waiting thread acquires the flag itself, so its own later reads (cp.async included) follow.
__device__ __forceinline__ void publish_ready(int* flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(flag), "r"(1) : "memory");
}
// The waiting side stops the kernel (a launch failure at the caller's next synchronisation) rather than
// hang if the flag stays down for 10 s: kernels that should run at once do not (see the concurrent
// forward in chunk_fwd.cuh for when hla assumes they do). A trap and no message: any call in a kernel
// (printf's included) makes ptxas serialise its wgmma products (warning C7510), and the waiting scan
// is a wgmma kernel.
__device__ __forceinline__ void wait_ready(const int* flag) {
    uint64_t t0 = 0;
    for (;;) {
        int v;
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
        if (v) return;
        uint64_t now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (t0 == 0) t0 = now;
        else if (now - t0 > 10'000'000'000ull) asm volatile("trap;");
        __nanosleep(200);
    }
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_kernel(after_kernel = true) may
// start while the kernel before it on the stream still runs, once every block of that kernel has
// called allow_dependent_launch (or exited); it must call wait_for_previous_kernel before it reads
// anything that kernel wrote. Both are no-ops without such a launch.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch with after_kernel
// (the kernel calls wait_for_previous_kernel first). Host side.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool after_kernel, Args&&... args) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = after_kernel ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}



// ---- warp matrix products ----------------------------------------------------------------------
//
// A strided view of a tile in shared memory: element (r, c) = p[r * rs + c * cs]. Any layout (row-major,
// transposed) is a pair of strides, so one product routine serves Qg·S, P·Ũ and Kdᵀ·Ũ alike.
template <class S>
struct Tile {
    const S* p;
    int rs, cs;
    __device__ __forceinline__ S at(int r, int c) const { return p[r * rs + c * cs]; }
    __device__ __forceinline__ Tile shifted(int r, int c) const { return Tile{p + r * rs + c * cs, rs, cs}; }
};

__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack2(__half lo, __half hi) {
    return uint32_t(__half_as_ushort(lo)) | (uint32_t(__half_as_ushort(hi)) << 16);
}

// 16 bytes of E from floats (VE = 16 / sizeof(E) of them) to a 16-byte-aligned address.
template <class E>
__device__ __forceinline__ void store_vec(E* dst, const float* v) {
    if constexpr (sizeof(E) == 4) {
        *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const E lo = from_f<E>(v[2 * j]), hi = from_f<E>(v[2 * j + 1]);
            w[j] = pack2(lo, hi);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// Four 8×8 matrices of 16-bit elements from shared memory, lane l giving the address of row l % 8 of
// matrix l / 8; .trans hands each thread the transposed fragment.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    const uint32_t s = uint32_t(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    const uint32_t s = uint32_t(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// d += a·b for one m16n8k16 tile, 16-bit inputs, fp32 accumulation.
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// d += a·b for one m16n8k8 tile, tf32 inputs.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// C[MT·16 × NT·8] += A[MT·16 × kdim] · B[kdim × NT·8] for one warp; A(m, k) and B(k, n) are tiles of
// storage type S in shared memory. The accumulator fragment of tile (i, j) holds, for lane = 4g + t,
// C(16i + g, 8j + 2t + {0, 1}) in c[i][j][0..1] and C(16i + g + 8, 8j + 2t + {0, 1}) in c[i][j][2..3].
//
// S = bf16 / fp16: mma m16n8k16. S = float: tf32 m16n8k8, and with kSplit the "3×tf32" scheme
// (a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi), which keeps fp32 inputs at about fp32 accuracy.
template <class S, int MT, int NT, bool kSplit = false>
__device__ __forceinline__ void warp_gemm(float (&c)[MT][NT][4], Tile<S> A, Tile<S> B, int kdim) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    if constexpr (sizeof(S) == 2) {
        // ldmatrix when one of each operand's strides is 1 (every tile of the scan: rows 16-byte aligned
        // by construction), element loads otherwise.
        const bool a_rows = A.cs == 1, a_cols = A.rs == 1;
        const bool b_kcont = B.rs == 1, b_ncont = B.cs == 1;
        const bool fast = (a_rows || a_cols) && (b_kcont || b_ncont) && NT % 2 == 0;
        const int mi = lane >> 3, r8 = lane & 7;
        for (int k0 = 0; k0 < kdim; k0 += 16) {
            uint32_t a[MT][4];
            if (fast) {
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    if (a_rows) ldmatrix_x4(a[i], &A.p[(16 * i + (mi & 1) * 8 + r8) * A.rs + k0 + (mi >> 1) * 8]);
                    else ldmatrix_x4_trans(a[i], &A.p[16 * i + (mi & 1) * 8 + (k0 + (mi >> 1) * 8 + r8) * A.cs]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int r = 16 * i + g;
                    a[i][0] = pack2(A.at(r, k0 + 2 * t), A.at(r, k0 + 2 * t + 1));
                    a[i][1] = pack2(A.at(r + 8, k0 + 2 * t), A.at(r + 8, k0 + 2 * t + 1));
                    a[i][2] = pack2(A.at(r, k0 + 2 * t + 8), A.at(r, k0 + 2 * t + 9));
                    a[i][3] = pack2(A.at(r + 8, k0 + 2 * t + 8), A.at(r + 8, k0 + 2 * t + 9));
                }
            }
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t b[2][2];
                if (fast) {
                    uint32_t x[4];
                    if (b_kcont) {
                        // stored [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                        ldmatrix_x4(x, &B.p[k0 + (mi & 1) * 8 + (8 * j + (mi >> 1) * 8 + r8) * B.cs]);
                    } else {
                        // stored [k][n]: the same four blocks, transposed on load
                        ldmatrix_x4_trans(x, &B.p[(k0 + (mi & 1) * 8 + r8) * B.rs + 8 * j + (mi >> 1) * 8]);
                    }
                    b[0][0] = x[0];
                    b[0][1] = x[1];
                    b[1][0] = x[2];
                    b[1][1] = x[3];
                } else {
#pragma unroll
                    for (int jj = 0; jj < 2 && j + jj < NT; ++jj) {
                        const int n = 8 * (j + jj) + g;
                        b[jj][0] = pack2(B.at(k0 + 2 * t, n), B.at(k0 + 2 * t + 1, n));
                        b[jj][1] = pack2(B.at(k0 + 2 * t + 8, n), B.at(k0 + 2 * t + 9, n));
                    }
                }
#pragma unroll
                for (int jj = 0; jj < 2; ++jj)
                    if (j + jj < NT)
#pragma unroll
                        for (int i = 0; i < MT; ++i) mma16(c[i][j + jj], a[i], b[jj], S());
            }
        }
    } else {
        for (int k0 = 0; k0 < kdim; k0 += 8) {
            uint32_t a[MT][4], al[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = 16 * i + g;
                const float x[4] = {A.at(r, k0 + t), A.at(r + 8, k0 + t), A.at(r, k0 + t + 4), A.at(r + 8, k0 + t + 4)};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    a[i][e] = to_tf32(x[e]);
                    if constexpr (kSplit) al[i][e] = to_tf32(x[e] - __uint_as_float(a[i][e]));
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int n = 8 * j + g;
                const float y[2] = {B.at(k0 + t, n), B.at(k0 + t + 4, n)};
                const uint32_t b[2] = {to_tf32(y[0]), to_tf32(y[1])};
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    if constexpr (kSplit) {
                        const uint32_t bl[2] = {to_tf32(y[0] - __uint_as_float(b[0])),
                                                to_tf32(y[1] - __uint_as_float(b[1]))};
                        mma_tf32(c[i][j], al[i], b);
                        mma_tf32(c[i][j], a[i], bl);
                    }
                    mma_tf32(c[i][j], a[i], b);
                }
            }
        }
    }
}

// Visits the accumulator fragment two neighbouring columns at a time: f(row, col, x[col], x[col + 1])
// with col even (the pairs a lane holds). MS: rows from one m-tile to the next (16: a warp's
// consecutive m-tiles; 64: a warpgroup product's, whose warp w holds rows 16w + 64i, wgmma.cuh).
template <int MT, int NT, int MS = 16, class F>
__device__ __forceinline__ void for_each_acc_pair(float (&c)[MT][NT][4], F&& f) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) f(MS * i + g + 8 * h, 8 * j + 2 * t, c[i][j][2 * h], c[i][j][2 * h + 1]);
}

// Visits the accumulator fragment: f(row, col, value&) for every element a lane holds.
template <int MT, int NT, int MS = 16, class F>
__device__ __forceinline__ void for_each_acc(float (&c)[MT][NT][4], F&& f) {
    for_each_acc_pair<MT, NT, MS>(c, [&](int r, int col, float& x0, float& x1) {
        f(r, col, x0);
        f(r, col + 1, x1);
    });
}

// Writes an accumulator tile to row-major memory (element (r, c) at dst[r · ld + c]) as E, two
// neighbouring columns per store. MS as for for_each_acc_pair.
template <class E, int MT, int NT, int MS = 16>
__device__ __forceinline__ void store_acc(const float (&c)[MT][NT][4], E* dst, int ld) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                E* at = dst + (MS * i + g + 8 * h) * ld + 8 * j + 2 * t;
                if constexpr (sizeof(E) == 4) {
                    *reinterpret_cast<float2*>(at) = make_float2(c[i][j][2 * h], c[i][j][2 * h + 1]);
                } else {
                    *reinterpret_cast<uint32_t*>(at) = pack2(from_f<E>(c[i][j][2 * h]), from_f<E>(c[i][j][2 * h + 1]));
                }
            }
}

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&c)[MT][NT][4]) {
    for_each_acc(c, [](int, int, float& x) { x = 0.f; });
}

// The leading strides of a view into a kernel's params (0 for an absent optional tensor). Host side.
template <int N>
inline void fill_strides(int64_t (&s)[N], const TensorView& x) {
    for (int i = 0; i < N; ++i) s[i] = x.defined() ? x.stride[i] : 0;
}

// The per-token transforms every linear kernel applies (SPECS.md §1): the scale, the in-kernel q/k L2
// norm, the gate and β activations. The forward, backward and decode parameter blocks derive from it,
// and cell_options fills it from the call's config in one place.
struct CellOptions {
    float scale;
    bool qk_l2norm;
    GateActivation gate_act;
    float lower_bound;
    BetaActivation beta_act;
};

inline CellOptions cell_options(const LinearConfig& cfg, double scale) {
    return {float(scale), cfg.qk_l2norm, cfg.gate_activation, cfg.lower_bound, cfg.beta_activation};
}

// The vector-decay gate activations (activations.hpp) in fast fp32, for the bf16 tensor-core kernels,
// where a full-precision expf and log1pf an element (~80 instructions for K = 128 channels of every
// token) were most of the in-kernel-gate forward's extra time over precomputed log decays (session
// 17: 0.50 against 0.38 ms, KDA B=4 T=4096; 0.41 with these). Two MUFU operations and a short series
// each; relative error a few 10⁻⁶ (__expf's), far below the bf16 rounding of the operands the decays
// scale. The fp32 and fp16 kernels and the scalar decays (one number a token) keep activations.hpp's.
//   softplus(x) = max(x, 0) + log1p(e), e = e^{−|x|} ∈ (0, 1], log1p(e) = 2 atanh(s) with
//   s = e / (2 + e) ∈ (0, 1/3]: the series to s¹³ is within 2·10⁻⁸ relative (exact to fp32 near 0,
//   where log1p(e) ≈ e, unlike log2(1 + e)).
__device__ __forceinline__ float fast_softplus(float x) {
    const float e = __expf(-fabsf(x));
    const float s = __fdividef(e, 2.f + e), s2 = s * s;
    float p = 1.f / 13.f;
    p = fmaf(p, s2, 1.f / 11.f);
    p = fmaf(p, s2, 1.f / 9.f);
    p = fmaf(p, s2, 1.f / 7.f);
    p = fmaf(p, s2, 1.f / 5.f);
    p = fmaf(p, s2, 1.f / 3.f);
    return fmaxf(x, 0.f) + 2.f * fmaf(s * s2, p, s);
}

// 1 / (1 + e^{−x}); below x = −80 the result (≤ 2·10⁻³⁵) is e^{−80}'s instead of a smaller one.
__device__ __forceinline__ float fast_sigmoid(float x) { return __fdividef(1.f, 1.f + __expf(fminf(-x, 80.f))); }

// gate_log_decay of activations.hpp with A = ea = e^{A_log} given (once a thread, not once an element).
template <GateActivation A>
__device__ __forceinline__ float fast_gate_log_decay(float x, float ea, float lower_bound) {
    static_assert(A != GateActivation::None, "fast_gate_log_decay: an activation");
    if constexpr (A == GateActivation::SoftplusDecay) return -ea * fast_softplus(x);
    else return lower_bound * fast_sigmoid(ea * x);
}

// The same with the activation chosen at run time (a ≠ None).
__device__ __forceinline__ float fast_gate_log_decay(GateActivation a, float x, float ea, float lower_bound) {
    return a == GateActivation::SoftplusDecay ? fast_gate_log_decay<GateActivation::SoftplusDecay>(x, ea, lower_bound)
                                              : fast_gate_log_decay<GateActivation::BoundedSigmoid>(x, ea, lower_bound);
}

// gate_derivatives of activations.hpp (d log decay / dx, / dA_log) in the same fast math (a ≠ None).
__device__ __forceinline__ void fast_gate_derivatives(GateActivation a, float x, float ea, float lower_bound, float* d_dx,
                                                      float* d_dalog) {
    if (a == GateActivation::SoftplusDecay) {
        *d_dx = -ea * fast_sigmoid(x);
        *d_dalog = -ea * fast_softplus(x);
    } else {
        const float s = fast_sigmoid(ea * x), ds = lower_bound * s * (1.f - s);
        *d_dx = ds * ea;
        *d_dalog = ds * ea * x;
    }
}

// f(gate) with gate(x) the activation a's log decay of gate input x as a compile-time choice, so that
// the loop over elements holds no branch on it (a ≠ None; e^{A_log} once here).
template <class F>
__device__ __forceinline__ auto with_fast_gate(GateActivation a, float a_log, float lower_bound, const F& f) {
    const float ea = expf(a_log);
    if (a == GateActivation::SoftplusDecay)
        return f([=](float x) { return fast_gate_log_decay<GateActivation::SoftplusDecay>(x, ea, lower_bound); });
    return f([=](float x) { return fast_gate_log_decay<GateActivation::BoundedSigmoid>(x, ea, lower_bound); });
}

// The in-chunk prefix sums of 64 per-token log decays held two per lane by one warp (tokens 2·lane and
// 2·lane + 1), in fp64: with g = −1000 the sums reach −6.4·10^4, where fp32 would put 0.4% errors into
// e^{b_i − b_j} of neighbouring tokens. b0, b1: the inclusive sums at the lane's two tokens; total: the
// whole chunk's, in every lane.
struct ChunkLogDecay {
    double b0, b1, total;
};
__device__ __forceinline__ ChunkLogDecay warp_chunk_log_decay(double a0, double a1, int lane) {
    double s = a0 + a1;
    for (int off = 1; off < 32; off <<= 1) {
        const double n = __shfl_up_sync(0xffffffffu, s, off);
        if (lane >= off) s += n;
    }
    return {s - a1, s, __shfl_sync(0xffffffffu, s, 31)};
}

// Backward of x ↦ f · x / ‖x‖ (the in-kernel q/k L2 norm and the scale f) for one row of K, by one warp:
// d ← (f d − x̂ ⟨x̂, f d⟩) / ‖x‖ in place, with x read through at(c); without the norm d ← f d.
template <class Load>
__device__ __forceinline__ void l2norm_scale_backward_row(float* d, int K, float f, bool l2norm, int lane, Load at) {
    if (!l2norm) {
        for (int c = lane; c < K; c += 32) d[c] *= f;
        return;
    }
    float ss = 0.f;
    for (int c = lane; c < K; c += 32) {
        const float x = at(c);
        ss += x * x;
    }
    ss = lane_group_sum<32>(ss);
    // one division a row: an IEEE division per element (with its slow-path check) was a fifth of the
    // tensor-core backward's issue slots (ncu, session 5)
    const float inv = 1.f / sqrtf(ss + float(kL2NormEps));
    float dot = 0.f;
    for (int c = lane; c < K; c += 32) dot += at(c) * inv * d[c] * f;
    dot = lane_group_sum<32>(dot);
    for (int c = lane; c < K; c += 32) d[c] = (d[c] * f - at(c) * inv * dot) * inv;
}

// Two neighbouring elements (i, i + 1) of a tensor of run-time dtype t: one 32-bit access for bf16
// when the address allows it, else two scalar ones (outputs and inputs may have any strides).
__device__ __forceinline__ void store_pair_any(void* p, DType t, int64_t i, float a, float b) {
    __nv_bfloat16* e = static_cast<__nv_bfloat16*>(p) + i;
    if (t == DType::BF16 && (reinterpret_cast<uintptr_t>(e) & 3) == 0) {
        *reinterpret_cast<__nv_bfloat162*>(e) = __floats2bfloat162_rn(a, b);
    } else {
        store_any(p, t, i, a);
        store_any(p, t, i + 1, b);
    }
}
// Two neighbouring elements of E at an address aligned to their pair (an accumulator fragment's column
// pair in shared memory) as floats, and back.
template <class E>
__device__ __forceinline__ float2 load_pair(const E* p) {
    if constexpr (sizeof(E) == 4) return *reinterpret_cast<const float2*>(p);
    else if constexpr (std::is_same_v<E, __nv_bfloat16>) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    else return __half22float2(*reinterpret_cast<const __half2*>(p));
}
template <class E>
__device__ __forceinline__ void store_pair(E* p, float a, float b) {
    if constexpr (sizeof(E) == 4) *reinterpret_cast<float2*>(p) = make_float2(a, b);
    else *reinterpret_cast<uint32_t*>(p) = pack2(from_f<E>(a), from_f<E>(b));
}
// load_pair for a bf16 pair that may not be 4-byte aligned (a row of an input tensor with free strides).
__device__ __forceinline__ __nv_bfloat162 load_bf16x2(const __nv_bfloat16* p) {
    if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) return *reinterpret_cast<const __nv_bfloat162*>(p);
    return __halves2bfloat162(p[0], p[1]);
}
__device__ __forceinline__ float2 load_pair_bf16(const __nv_bfloat16* p) { return __bfloat1622float2(load_bf16x2(p)); }


}  // namespace hla::linear::cuda
