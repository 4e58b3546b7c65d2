// hla — small dense kernels for the CPU backends: a register-blocked fp32 matrix product and a
// vectorised exp. Written with GCC vector extensions so one source compiles to AVX-512 (16 floats a
// register) with -march=native on the project's machines and to narrower registers elsewhere.
//
// The matrices here are chunk-sized (64 × 128 × 128): they live in L1/L2, so a register-blocked
// micro-kernel without packing reaches most of the FMA peak; packing would cost more than it saves.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace hla::cpu {

// An allocator that starts every buffer on a 64-byte cache line. The kernels' scratch rows are read
// with 64-byte vector loads; malloc aligns to 16 bytes, so a plain std::vector's rows crossed a line on
// every load or not depending on where the heap put it, and the speed of the same binary changed by
// ~10% from one process to the next.
template <class T>
struct LineAllocator {
    using value_type = T;
    LineAllocator() = default;
    template <class U>
    LineAllocator(const LineAllocator<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const LineAllocator<U>&) const { return true; }
};
using FloatBuffer = std::vector<float, LineAllocator<float>>;

constexpr int kVec = 16;  // floats per vector register (AVX-512); the compiler splits it on narrower ISAs
typedef float vf __attribute__((vector_size(kVec * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(kVec * sizeof(float)), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }
// Broadcast. (Not `vf{} + x`: 0 + x is not an identity for x = −0, so the compiler keeps a scalar add.)
static_assert(kVec == 16, "splat spells out 16 lanes");
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// C[i, j] = beta·C[i, j] + alpha · Σ_p A[i·a_row + p·a_col] · B[p·ldb + j]
//   i < M, j < N, p < P; B rows contiguous, A with arbitrary strides (so Aᵀ costs nothing);
//   beta = 0 overwrites C (C may hold garbage); any other beta scales C first (1 accumulates, and a
//   scalar decay of C, as the chunked forward's state update needs, costs no separate pass over C).
void gemm(int64_t M, int64_t N, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The same with a scale per row of C: C[i, j] = row_beta[i]·C[i, j] + alpha · Σ_p A[…]·B[…] (the
// vector-decay state update, diag(γ) S + K̄ᵀX, in one read and write of S). C is always read: unlike a
// scalar beta of 0, a row_beta of 0 keeps a NaN of C.
void gemm_row_beta(int64_t M, int64_t N, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col,
                   const float* B, int64_t ldb, const float* row_beta, float* C, int64_t ldc);

// exp of each lane, for x ≤ 88; |relative error| < 2e-7; x < −87.3 gives 0 (the true value underflows).
// exp(x) = 2^n · exp(r), n = round(x·log2 e), r = x − n·ln2 ∈ [−ln2/2, ln2/2], exp(r) by its degree-6
// Taylor polynomial (truncation error < 3e-8 there); 2^n is built directly in the exponent bits.
// Inline so that kernels can apply it to values already in registers.
typedef int32_t vi __attribute__((vector_size(kVec * sizeof(int32_t))));
inline vf exp_vec(vf x) {
    const vf lo = splat(-87.3f), hi = splat(88.0f);
    const vi underflow = x < lo;
    vf xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    // round to nearest: adding 1.5·2^23 pushes the fraction out of the mantissa
    const vf shifter = splat(12582912.0f);
    const vf n = (xc * splat(1.44269504088896341f) + shifter) - shifter;
    const vf r = (xc - n * splat(0.693145751953125f)) - n * splat(1.42860682030941723212e-6f);
    vf p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    const vf y = p * two_n;
    return underflow ? splat(0.0f) : y;
}

// y[i] = exp(x[i]) with exp_vec's accuracy.
void exp_inplace(float* x, int64_t n);

// Scalar version with the same accuracy, for odd sizes.
float exp_scalar(float x);

// Σ_i x[i]·y[i], vectorised.
inline float dot(const float* x, const float* y, int64_t n) {
    vf acc = vf{};
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) acc += load(x + i) * load(y + i);
    float s = 0;
    for (int l = 0; l < kVec; ++l) s += acc[l];
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

// Σ_i x[i]·y[i]·z[i], vectorised (a plain loop would add in order: the compiler may not reassociate).
inline float dot3(const float* x, const float* y, const float* z, int64_t n) {
    vf acc = vf{};
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) acc += load(x + i) * load(y + i) * load(z + i);
    float s = 0;
    for (int l = 0; l < kVec; ++l) s += acc[l];
    for (; i < n; ++i) s += x[i] * y[i] * z[i];
    return s;
}

// Copies a [rows, cols] block with row stride ld into a contiguous [cols, rows] block (transpose).
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst);

// While alive, the calling thread flushes subnormal floats to zero (x86: MXCSR flush-to-zero and
// denormals-are-zero; elsewhere nothing), and restores its previous mode on exit. The running products
// of per-token decays pass through the subnormal range on their way to 0 under deep gates, and some
// x86 cores take a ~100-cycle microcode assist per subnormal result; values below FLT_MIN (1.2e-38)
// become 0, as exp_inplace already makes them.
class FlushSubnormals {
public:
    FlushSubnormals();
    ~FlushSubnormals();
    FlushSubnormals(const FlushSubnormals&) = delete;
    FlushSubnormals& operator=(const FlushSubnormals&) = delete;

private:
    unsigned saved_ = 0;
};

}  // namespace hla::cpu
