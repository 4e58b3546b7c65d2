// The CPU kernels' building blocks against plain loops: transpose (register-tiled where AVX-512 is
// available, with scalar edges) and gemm, on sizes that hit every edge of their tiling.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <string>
#include <utility>
#include <limits>
#include <random>
#include <vector>

#include "core/cpu_math.hpp"

namespace {

std::vector<float> random_matrix(int64_t n, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> m(static_cast<size_t>(n));
    for (float& x : m) x = u(gen);
    return m;
}

TEST(CpuMath, TransposeEqualsElementCopyOnEveryTileEdge) {
    for (int64_t rows : {1, 7, 16, 17, 48, 64}) {
        for (int64_t cols : {1, 15, 16, 33, 128}) {
            const int64_t ld = cols + 3;  // a block inside a wider matrix
            const std::vector<float> src = random_matrix(rows * ld, unsigned(rows * 131 + cols));
            std::vector<float> dst(size_t(rows * cols), -7.0f);
            hla::cpu::transpose(src.data(), rows, cols, ld, dst.data());
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t c = 0; c < cols; ++c)
                    ASSERT_EQ(dst[size_t(c * rows + r)], src[size_t(r * ld + c)])
                        << "rows " << rows << " cols " << cols << " at (" << r << ", " << c << ")";
        }
    }
}

// beta = 0 overwrites (C starts as NaN garbage), 1 accumulates, anything else scales C first (the
// chunked forward's scalar state decay); gemm_row_beta scales each row by its own beta (vector decay,
// one row of 0 among them; C is read there, so unlike beta = 0 a NaN in C stays NaN); P = 0 leaves beta·C.
TEST(CpuMath, GemmMatchesTripleLoopWithStridesAndEveryBeta) {
    // beta per row (gemm_row_beta) when per_row, else the scalar beta
    const std::pair<bool, float> cases[] = {{false, 0.0f}, {false, 1.0f}, {false, 0.37f}, {true, 0.0f}};
    for (const auto& [per_row, beta] : cases) {
        for (int64_t M : {1, 8, 13}) {
            for (int64_t N : {1, 16, 40}) {
                for (int64_t P : {0, 1, 9, 64}) {
                    // A read transposed (a_row = 1, a_col = M) to cover arbitrary strides
                    const std::vector<float> A = random_matrix(P * M, 1), B = random_matrix(P * N, 2);
                    std::vector<float> row_beta = random_matrix(M, 4);
                    for (float& r : row_beta) r = std::abs(r);
                    row_beta[size_t(M / 2)] = 0.0f;
                    std::vector<float> C = random_matrix(M * N, 3);
                    if (!per_row && beta == 0.0f) C.assign(C.size(), std::numeric_limits<float>::quiet_NaN());
                    if (per_row)
                        hla::cpu::gemm_row_beta(M, N, P, 0.5f, A.data(), 1, M, B.data(), N, row_beta.data(), C.data(), N);
                    else
                        hla::cpu::gemm(M, N, P, 0.5f, A.data(), 1, M, B.data(), N, beta, C.data(), N);
                    const std::vector<float> C0 = random_matrix(M * N, 3);
                    std::vector<float> expect(C.size());
                    for (int64_t i = 0; i < M; ++i)
                        for (int64_t j = 0; j < N; ++j) {
                            double s = 0;
                            for (int64_t p = 0; p < P; ++p) s += double(A[size_t(p * M + i)]) * B[size_t(p * N + j)];
                            const double b = per_row ? double(row_beta[size_t(i)]) : double(beta);
                            const double c0 = b == 0.0 ? 0.0 : b * C0[size_t(i * N + j)];
                            expect[size_t(i * N + j)] = float(c0 + 0.5 * s);
                        }
                    for (size_t t = 0; t < C.size(); ++t)
                        ASSERT_NEAR(C[t], expect[t], 1e-5f * (1.0f + float(P)))
                            << "beta " << (per_row ? "per row" : std::to_string(beta)) << " M " << M
                            << " N " << N << " P " << P;
                }
            }
        }
    }
}

TEST(CpuMath, FlushSubnormalsIsScopedToTheGuard) {
#if !defined(__SSE__)
    GTEST_SKIP() << "subnormal flushing is set through the x86 MXCSR only";
#else
    volatile float tiny = FLT_MIN, half = 0.5f;  // volatile: computed at run time, under the thread's mode
    EXPECT_GT(tiny * half, 0.0f) << "subnormal results are kept by default";
    {
        const hla::cpu::FlushSubnormals flush;
        EXPECT_EQ(tiny * half, 0.0f) << "flushed inside the guard";
    }
    EXPECT_GT(tiny * half, 0.0f) << "the previous mode is restored";
#endif
}

}  // namespace
