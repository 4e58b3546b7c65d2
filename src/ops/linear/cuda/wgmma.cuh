// hla — Hopper warpgroup matrix products (wgmma, sm_90a) on bf16 tiles in shared memory, and the
// swizzled tile layout they read.
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) computes D[64, N] (+)= A[64, 16] B[16, N]
// per instruction, both operands read from shared memory through 64-bit descriptors, D in registers.
// D's layout is that of four warps' mma.sync m16n8 accumulators side by side: warp w of the group holds
// rows [16w, 16w + 16) as float[N / 8][4], so the accumulator helpers of common.cuh apply unchanged.
// Against mma.sync with ldmatrix, a product's B operand is read once per warpgroup instead of once per
// warp (the scans' state and Ũ tiles were read four times a chunk) and nothing passes through registers.
#pragma once

#include <cstdint>

namespace hla::linear::cuda::wg {

// A swizzled tile: R rows × C bf16 columns, stored as C / BC blocks one after the other, each block
// [R][BC] row-major with rows of BC·2 bytes (32, 64 or 128) in the hardware's swizzle of that width
// (CuTe's Swizzle<b, 4, 3>, b = log2(BC / 8)): 16-byte piece c of row r sits at piece
// c ^ ((r >> (3 − b)) mod 2^b). The pattern repeats every 8 rows, so a tile's base must be aligned to
// 8 rows of a block (kAtomBytes); every tile of the scans is a multiple of that size.
//
// The same bytes serve as a K-major operand (rows = M or N, the 16-column k-steps along a row) and as
// an MN-major one (rows = K, M or N along a row): a tile is copied once in the order it has in global
// memory and each product reads it whichever way round it needs.
template <int BC>
struct Swz {
    static constexpr int kRowBytes = BC * 2;
    static_assert(kRowBytes == 32 || kRowBytes == 64 || kRowBytes == 128, "wg::Swz: blocks of 16, 32 or 64 columns");
    static constexpr int kBits = kRowBytes == 128 ? 3 : kRowBytes == 64 ? 2 : 1;
    static constexpr int kMode = kBits == 3 ? 1 : kBits == 2 ? 2 : 3;  // the descriptor's swizzle field
    static constexpr int kAtomBytes = 8 * kRowBytes;
    static constexpr int kPieces = BC / 8;  // 16-byte pieces of a block row
    // byte offset of 16-byte piece pc (counted across the blocks) of row r, in a tile of R rows
    template <int R>
    static __device__ __forceinline__ uint32_t piece(int r, int pc) {
        const int blk = pc / kPieces, c = pc % kPieces;
        return uint32_t(blk * (R * kRowBytes) + r * kRowBytes + ((c ^ ((r >> (3 - kBits)) & ((1 << kBits) - 1))) << 4));
    }
    // byte offset of element (r, col)
    template <int R>
    static __device__ __forceinline__ uint32_t elem(int r, int col) {
        return piece<R>(r, col >> 3) + uint32_t(col & 7) * 2;
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// The first kAlign-aligned byte of the dynamic shared memory `smem`, as a pointer derived from the
// shared array itself: the compiler then keeps the accesses through it shared (LDS, STS). A pointer
// rebuilt from an integer (the aligned address) is generic, and so is every access through it: the
// forming warps' loads of k in the forward scan were LD.E (ncu source counters, session 13).
template <uint32_t kAlign>
__device__ __forceinline__ unsigned char* aligned_smem(void* smem) {
    const uint32_t a = smem_addr(smem);
    return static_cast<unsigned char*>(smem) + ((kAlign - (a & (kAlign - 1))) & (kAlign - 1));
}

// The 64-bit shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (all >> 4), swizzle mode; base offset 0 (tiles start on their
// pattern's boundary).
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo, int mode) {
    return uint64_t((saddr & 0x3FFFF) >> 4) | uint64_t((lbo & 0x3FFFF) >> 4) << 16 |
           uint64_t((sbo & 0x3FFFF) >> 4) << 32 | uint64_t(mode) << 62;
}

// K-major operand (A: [M = 64][K], B: [N][K]) from a Swz<64> tile of R rows, k-step s (columns
// [16s, 16s + 16)): within a 128-byte row a k-step starts 32 bytes on, the next block R rows on.
// The leading offset is unused for swizzled K-major layouts; the stride offset is 8 rows.
template <int R>
__device__ __forceinline__ uint64_t desc_k_major(const void* tile, int s) {
    const uint32_t a = smem_addr(tile) + uint32_t((s >> 2) * (R * 128) + (s & 3) * 32);
    return make_desc(a, 16, 8 * 128, Swz<64>::kMode);
}

// MN-major operand (A: [K][M = BC], B: [K][N = BC]) from one block of a Swz<BC> tile whose rows are K,
// k-step s (rows [16s, 16s + 16)). The stride offset is 8 rows (the next 8 of K); the leading offset,
// the next block of M or N, is unused with an instruction that spans one block.
template <int BC>
__device__ __forceinline__ uint64_t desc_mn_major(const void* block, int s) {
    constexpr int RB = Swz<BC>::kRowBytes;
    return make_desc(smem_addr(block) + uint32_t(s * 16 * RB), 8 * RB, 8 * RB, Swz<BC>::kMode);
}

// wgmma.fence before a batch of products whose accumulators other instructions wrote; commit closes a
// batch; wait<N> returns once at most N batches of this warpgroup are in flight.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Ties the accumulators to this point of the program: the compiler may not move their uses above a
// wait (nor their definitions below a product) — it does not know the product writes them late.
template <int MT, int NT>
__device__ __forceinline__ void fence_acc(float (&c)[MT][NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[i][j][e])::"memory");
}
// Shared memory written by ordinary stores (or cp.async) that a product reads next: each writing thread
// fences before the barrier that orders the two.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// d (+)= A B for one k-step: m64nNk16, bf16 operands, fp32 accumulators (accumulate = 0: d = A B).
// TA / TB: A M-major / B N-major (1) or K-major (0).
template <int TA, int TB>
__device__ __forceinline__ void mma(float (&d)[2][4], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
          "+f"(d[1][3])
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void mma(float (&d)[4][4], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
          "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
          "+f"(d[3][2]), "+f"(d[3][3])
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

template <int TA, int TB>
__device__ __forceinline__ void mma(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

// The scans' two product shapes, each a batch of k-steps issued back to back (commit / finish below).
// A is a Swz<64> tile of 64 rows (the chunk's rows, in 64-column blocks); B a Swz<N> tile whose rows
// are the k index (MN-major), N = the accumulator's columns.
//   rows_product: D[64, N] (+)= A B, A's rows D's rows, `steps` k-steps of 16 of A's columns
//                 (W S, Qg S, P Ũ, Kd dS); accumulate = false: the first step overwrites D.
//   cols_product: D_i[64, N] += (A's column block i)ᵀ B, i < MT, over A's 64 rows (Kdᵀ Ũ, Qgᵀ dO,
//                 Wᵀ dX, Pᵀ dO): A read M-major, block i at 64 rows × 128 bytes on.
template <int STEPS, int NT>
__device__ __forceinline__ void rows_product(float (&d)[NT][4], const void* a, const void* b, bool accumulate) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s)
        mma<0, 1>(d, desc_k_major<64>(a, s), desc_mn_major<NT * 8>(b, s), accumulate || s > 0);
}
template <int MT, int NT>
__device__ __forceinline__ void cols_product(float (&d)[MT][NT][4], const unsigned char* a, const void* b) {
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int i = 0; i < MT; ++i)
            mma<1, 1>(d[i], desc_mn_major<64>(a + i * (64 * Swz<64>::kRowBytes), s), desc_mn_major<NT * 8>(b, s), 1);
}
// Closes the batch and waits for it: the accumulators are final after this.
template <int MT, int NT>
__device__ __forceinline__ void finish(float (&c)[MT][NT][4]) {
    commit();
    wait<0>();
    fence_acc(c);
}

}  // namespace hla::linear::cuda::wg
