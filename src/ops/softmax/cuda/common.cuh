// hla — device helpers of the softmax family's CUDA kernels: the POD parameter structs, tensor-core
// fragments (mma.sync m16n8k16, ldmatrix), cp.async and the shared-memory swizzle.
//
// Fragment layouts of mma.sync.m16n8k16 (lane = threadIdx.x % 32, r = lane / 4, c = 2 · (lane % 4)):
//   A 16×16 (4 × b32): a0 = A[r][c, c+1], a1 = A[r+8][c, c+1], a2 = A[r][c+8, c+9], a3 = A[r+8][c+8, c+9]
//   B 16×8  (2 × b32): b0 = B[c, c+1][r],  b1 = B[c+8, c+9][r]
//   C 16×8  (4 × f32): c0, c1 = C[r][c, c+1],  c2, c3 = C[r+8][c, c+1]
// so the C fragments of two neighbouring 16×8 score blocks are, element for element, the A fragment of
// the 16×16 probability block that multiplies V: no shuffle between the two matmuls.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cuda/stream.cuh"

namespace hla::softmax::cuda {

using hla::detail::launch_stream;  // the stream of every launch (core/cuda/stream.cuh)

// ---- parameters (plain data: pointers and element strides) ----------------------------------------

struct FwdParams {
    const void *q, *k, *v, *g, *gate;
    void* o;
    float* lse;
    const void* cu_seqlens;  // null: B rows of T tokens
    bool cu64;               // cu_seqlens is int64
    int B, T, HQ, HKV, G;
    int64_t q_s[3], k_s[3], v_s[3], o_s[3], gate_s[3], g_s[3], lse_s[3];  // strides of dims 0..2
    int o_dtype;  // 0 bf16, 1 f16, 2 f32
    int g_dtype;  // same codes, for g and gate (inputs: same dtype as q unless f32)
    int gate_dtype;
    float scale_log2;  // scale · log2(e): scores are kept in base 2
    int window;        // 0 = unlimited
    bool causal;
};

struct BwdParams {
    FwdParams f;             // the forward's inputs and o, lse
    const void* d_o;
    int64_t do_s[3];
    void *dq, *dk, *dv, *dgate;
    float* dg;
    int64_t dq_s[3], dk_s[3], dv_s[3], dgate_s[3], dg_s[3];
    int dq_dtype, dk_dtype, dv_dtype, dgate_dtype;
    int do_dtype;  // d_o (an input: bf16 | f16 | f32)
    // Workspace (fp32, compact [B, T, HQ, …]): dQ accumulated by bulk reductions, delta = Σ dO ⊙ o,
    // lse in base 2, the gradient of the ungated output dA (input dtype) when there is a gate, and
    // the row / column sums of dS for the forget-gate gradient.
    float *dq_acc, *delta, *lse2, *rowsum, *colsum;
    void* dA;
    float scale;
};

struct DecodeParams {
    const void *q, *k_cache, *v_cache, *g_cache, *gate;
    void* o;
    float* lse;
    const void* cache_seqlens;
    bool lens64;
    const void* cache_batch_idx;
    bool idx64;
    const int* block_table;
    int64_t bt_s0;
    int N, TQ, HQ, HKV, G, capacity, page_size;
    bool append;
    int64_t q_s[3], kc_s[3], vc_s[3], gc_s[3], gate_s[3], o_s[3], lse_s[3];
    int o_dtype, gate_dtype;
    float scale_log2;
    int window;
    bool causal;
    int splits;       // key splits per (sequence, kv head)
    float* part_o;    // [N, HQ, TQ, splits, D] fp32 partial outputs
    float* part_ml;   // [N, HQ, TQ, splits, 2] running max (base 2) and sum
};

// ---- element types --------------------------------------------------------------------------------

template <class T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};
template <> struct Pack2<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

// Loads one element of a tensor whose dtype code is known only at run time (0 bf16, 1 f16, 2 f32).
__device__ __forceinline__ float load_any(const void* p, int64_t i, int dtype) {
    if (dtype == 0) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
    return static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void store_any(void* p, int64_t i, int dtype, float x) {
    if (dtype == 0)
        static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(x);
    else if (dtype == 1)
        static_cast<__half*>(p)[i] = __float2half(x);
    else
        static_cast<float*>(p)[i] = x;
}

// ---- tensor cores ---------------------------------------------------------------------------------

template <class T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// Four 8×8 b16 matrices; lane l supplies the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// ---- asynchronous copies --------------------------------------------------------------------------

// 16 bytes global → shared; `valid` false writes zeros (rows past the sequence end).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
// 4 bytes global → shared (scalars: lse, delta); `valid` false writes zeros.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Bulk reductions (sm_90 copy engine): `bytes` (a multiple of 16, both addresses 16-byte aligned) of
// fp32 in shared memory added element-wise into global memory by the copy engine, one instruction
// for a whole row instead of an atomic per element. The shared source is read asynchronously: its
// writers fence it for the async proxy first, and it is rewritten only after wait_read.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, const float* smem, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem),
                 "r"(smem_addr(smem)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk groups but the N latest have finished reading shared memory.
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// This thread's bulk groups have completed (their global writes are done).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's ordinary shared-memory writes before later reads by the async proxy.
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// A tile of ROWS × D b16 elements in shared memory, rows of D/8 16-byte chunks. Chunk c of row r is
// stored at chunk c ^ (r % 8): the 8 rows an ldmatrix reads at one column then hit 8 different bank
// groups instead of one (D ≥ 64 keeps the XOR inside the row).
template <int D> __device__ __forceinline__ int swz(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }

// Copies ROWS rows (global row i at base + i · row_stride elements) into a swizzled tile with all
// threads of the block; rows ≥ valid_rows are zero-filled.
template <int ROWS, int D, int THREADS, class T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t row_stride, int valid_rows) {
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const bool ok = r < valid_rows;
        const T* src = base + (ok ? int64_t(r) * row_stride : 0) + c * 8;
        cp_async16(tile + swz<D>(r, c), src, ok);
    }
}

// 2^x on the special-function unit (one MUFU.EX2; flushes denormal results to 0, and 2^−inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Scan of 32·PER values held PER per lane (value c = lane·PER + e), in prefix (c ascending) or suffix
// (c descending) order, written to out[c] as base + the inclusive or exclusive partial sum; returns
// the total to every lane. The forget-gate sums use it so that a block's gates are loaded in parallel
// rather than by one thread in a dependent chain.
template <int PER>
__device__ __forceinline__ float warp_scan(const float (&v)[PER], float base, float* out, bool suffix, bool exclusive) {
    const int lane = threadIdx.x % 32;
    float local = 0.f;
#pragma unroll
    for (int e = 0; e < PER; ++e) local += v[e];
    float x = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = suffix ? __shfl_down_sync(0xffffffff, x, o) : __shfl_up_sync(0xffffffff, x, o);
        if (suffix ? lane + o < 32 : lane >= o) x += y;
    }
    float run = base + (x - local);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int e = suffix ? PER - 1 - k : k;
        if (exclusive) {
            out[lane * PER + e] = run;
            run += v[e];
        } else {
            run += v[e];
            out[lane * PER + e] = run;
        }
    }
    return __shfl_sync(0xffffffff, x, suffix ? 0 : 31);
}

__device__ __forceinline__ int64_t read_index(const void* p, bool is64, int i) {
    return is64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

}  // namespace hla::softmax::cuda
