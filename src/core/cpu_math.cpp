#include "core/cpu_math.hpp"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace hla::cpu {

namespace {

// MR rows × NV vectors of columns, accumulated in registers over the whole P loop.
// 8 × 2 vectors = 16 accumulators (+2 B loads, +1 broadcast) fits the 32 AVX-512 registers.
template <int MR, int NV>
inline void micro_kernel(int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col, const float* B,
                         int64_t ldb, float beta, const float* row_beta, float* C, int64_t ldc) {
    // gemm returns before here when P ≤ 0. Said to the compiler, it keeps the accumulators in registers
    // from start to store; for a P that might be 0 it zeroed them on the stack and went through it at the
    // end (~60 cycles a tile: 4% of a 64 × 128 × 128 product, 7% of 128 × 128 × 64, 1 thread).
    if (P < 1) __builtin_unreachable();
    vf acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
    for (int64_t p = 0; p < P; ++p) {
        vf b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load(B + p * ldb + v * kVec);
        for (int r = 0; r < MR; ++r) {
            const vf a = splat(A[r * a_row + p * a_col]);
            for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
    }
    const vf va = splat(alpha), vb = splat(beta);
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
            float* c = C + r * ldc + v * kVec;
            if (row_beta) store(c, splat(row_beta[r]) * load(c) + va * acc[r][v]);
            else if (beta == 0.0f) store(c, va * acc[r][v]);
            else if (beta == 1.0f) store(c, load(c) + va * acc[r][v]);
            else store(c, vb * load(c) + va * acc[r][v]);
        }
}

template <int NV>
inline void row_panel(int64_t M, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col,
                      const float* B, int64_t ldb, float beta, const float* row_beta, float* C, int64_t ldc) {
    // 8 rows: the 16-row causal blocks and the 64/128-row chunk products split without a remainder.
    int64_t i = 0;
    for (; i + 8 <= M; i += 8)
        micro_kernel<8, NV>(P, alpha, A + i * a_row, a_row, a_col, B, ldb, beta, row_beta ? row_beta + i : nullptr,
                            C + i * ldc, ldc);
    const float* a = A + i * a_row;
    const float* rb = row_beta ? row_beta + i : nullptr;
    float* c = C + i * ldc;
    switch (M - i) {
        case 7: micro_kernel<7, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 6: micro_kernel<6, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 5: micro_kernel<5, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 4: micro_kernel<4, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 3: micro_kernel<3, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 2: micro_kernel<2, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        case 1: micro_kernel<1, NV>(P, alpha, a, a_row, a_col, B, ldb, beta, rb, c, ldc); break;
        default: break;
    }
}

// The product with C's row i scaled by row_beta[i] (row_beta == nullptr: by the scalar beta) first.
void gemm_impl(int64_t M, int64_t N, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col,
               const float* B, int64_t ldb, float beta, const float* row_beta, float* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    const auto scaled = [&](int64_t i, float x) {
        const float b = row_beta ? row_beta[i] : beta;
        return !row_beta && beta == 0.0f ? 0.0f : b * x;
    };
    if (P <= 0) {
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = scaled(i, C[i * ldc + j]);
        return;
    }
    int64_t j = 0;
    for (; j + 2 * kVec <= N; j += 2 * kVec)
        row_panel<2>(M, P, alpha, A, a_row, a_col, B + j, ldb, beta, row_beta, C + j, ldc);
    for (; j + kVec <= N; j += kVec) row_panel<1>(M, P, alpha, A, a_row, a_col, B + j, ldb, beta, row_beta, C + j, ldc);
    if (j < N) {
        // Column tail (N not a multiple of 16: small test shapes): plain loops.
        for (int64_t i = 0; i < M; ++i)
            for (int64_t jj = j; jj < N; ++jj) {
                float s = 0;
                for (int64_t p = 0; p < P; ++p) s += A[i * a_row + p * a_col] * B[p * ldb + jj];
                C[i * ldc + jj] = scaled(i, C[i * ldc + jj]) + alpha * s;
            }
    }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
    gemm_impl(M, N, P, alpha, A, a_row, a_col, B, ldb, beta, nullptr, C, ldc);
}

void gemm_row_beta(int64_t M, int64_t N, int64_t P, float alpha, const float* A, int64_t a_row, int64_t a_col,
                   const float* B, int64_t ldb, const float* row_beta, float* C, int64_t ldc) {
    gemm_impl(M, N, P, alpha, A, a_row, a_col, B, ldb, 1.0f, row_beta, C, ldc);
}

void exp_inplace(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) store(x + i, exp_vec(load(x + i)));
    if (i < n) {
        float tail[kVec] = {};
        std::memcpy(tail, x + i, size_t(n - i) * sizeof(float));
        store(tail, exp_vec(load(tail)));
        std::memcpy(x + i, tail, size_t(n - i) * sizeof(float));
    }
}

float exp_scalar(float x) {
    float v[kVec] = {x};
    store(v, exp_vec(load(v)));
    return v[0];
}

#if defined(__AVX512F__)
namespace {
// GCC 12's AVX-512 headers build some shuffles from _mm512_undefined_ps() and then warn that the
// undefined register is "used uninitialized" where they are inlined: a known false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One 16 × 16 tile in registers: 32-bit, 64-bit and two 128-bit-lane interleaves (64 shuffles for 256
// elements, against a strided scalar store per element).
inline void transpose_tile16(const float* src, int64_t ld, float* dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}
#pragma GCC diagnostic pop
}  // namespace
#endif

void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
    int64_t r0 = 0, c_full = 0;
#if defined(__AVX512F__)
    // The chunked kernels transpose [16·m, K] blocks many times per chunk: whole tiles in registers.
    c_full = cols / 16 * 16;
    for (; r0 + 16 <= rows; r0 += 16)
        for (int64_t c = 0; c < c_full; c += 16) transpose_tile16(src + r0 * ld + c, ld, dst + c * rows + r0, rows);
    for (int64_t r = 0; r < r0; ++r)
        for (int64_t c = c_full; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
#endif
    for (int64_t r = r0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
}

#if defined(__SSE__)
// MXCSR bit 15: flush-to-zero (subnormal results), bit 6: denormals-are-zero (subnormal inputs).
constexpr unsigned kFlushBits = 0x8040;
FlushSubnormals::FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushBits); }
FlushSubnormals::~FlushSubnormals() { _mm_setcsr(saved_); }
#else
FlushSubnormals::FlushSubnormals() = default;
FlushSubnormals::~FlushSubnormals() = default;
#endif

}  // namespace hla::cpu
