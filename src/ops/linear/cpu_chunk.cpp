#include "ops/linear/cpu_chunk.hpp"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "core/cpu_math.hpp"

namespace hla::linear::cpu {

using hla::cpu::exp_inplace;
using hla::cpu::gemm;
using hla::cpu::gemm_row_beta;
using hla::cpu::transpose;

Workspace::Workspace(int64_t K_, int64_t V_) : K(K_), V(V_) {
    const int64_t C = kChunk, D = std::max(K, V);
    for (auto* buf : {&eb, &ebar, &ea, &kt, &kg, &qg, &kbar, &dqg, &dkbar, &dkg, &tmp1, &tmp2, &blk_out}) buf->assign(C * K, 0.0f);
    for (auto* buf : {&y, &x, &xt, &dx, &z, &dy}) buf->assign(C * V, 0.0f);
    for (auto* buf : {&d, &a, &p, &gamma_lower, &dp, &da}) buf->assign(C * C, 0.0f);
    s0t.assign(K * V, 0.0f);
    dst.assign(K * V, 0.0f);
    blk_x.assign(kBlock * K, 0.0f);
    blk_yt.assign(C * K, 0.0f);
    row.assign(std::max<int64_t>(D, C), 0.0f);
    row2.assign(std::max<int64_t>(D, C), 0.0f);
    before.assign((C / kBlock) * C * K, 0.0f);
    diag.assign(C, 0.0f);
    u.assign(C, 0.0f);
    w.assign(C, 0.0f);
    f.assign(C * C, 0.0f);
    db.assign(C * K, 0.0f);
    within_block.assign(C * K, 0.0f);
    within_block_inv.assign(C * K, 0.0f);
    diag_block.assign(kBlock * kBlock, 0.0f);
    block_as_product.assign(C / kBlock, 0);
}

namespace {

// ---- lower-triangular products --------------------------------------------------------------------
// The intra-chunk matrices are causal (lower triangular): products with them run in 16-row blocks that
// stop at the diagonal, which skips ~40% of the multiply-adds a full 64 × 64 product would do.

// E[i, j] ← Σ_c x[i, c] · yt[c, j] for the blocks on or below the diagonal (entries above it inside a
// diagonal block are computed too and must be masked by the caller). x [L, K]; yt [K, ld_yt].
void lower_scores(int L, int64_t K, const float* x, const float* yt, int64_t ld_yt, float* E) {
    for (int i0 = 0; i0 < L; i0 += kBlock) {
        const int i1 = std::min(L, i0 + kBlock);
        gemm(i1 - i0, i1, K, 1.0f, x + i0 * K, K, 1, yt, ld_yt, 0.0f, E + i0 * kChunk, kChunk);
    }
}

// out[i] (+)= alpha Σ_{j ≤ i} E[i, j] x[j]    (E lower triangular, ld kChunk; x, out [L, N])
void lower_apply(int L, int64_t N, float alpha, const float* E, const float* x, float beta, float* out) {
    for (int i0 = 0; i0 < L; i0 += kBlock) {
        const int i1 = std::min(L, i0 + kBlock);
        gemm(i1 - i0, N, i1, alpha, E + i0 * kChunk, kChunk, 1, x, N, beta, out + i0 * N, N);
    }
}

// out[j] (+)= alpha Σ_{i ≥ j} E[i, j] x[i]   (Eᵀ times x)
void lower_apply_t(int L, int64_t N, float alpha, const float* E, const float* x, float beta, float* out) {
    for (int j0 = 0; j0 < L; j0 += kBlock) {
        const int j1 = std::min(L, j0 + kBlock);
        gemm(j1 - j0, N, L - j0, alpha, E + j0 * kChunk + j0, 1, kChunk, x + j0 * N, N, beta, out + j0 * N, N);
    }
}

// x[e] −= Σ_{m<n} c[m·c_step] rows[m·N + e] for e < N: one row of a forward substitution, accumulated in
// registers (the plain row-by-row axpy loop stored and reloaded x for every m, and was the solves' cost).
void subtract_rows(float* x, int64_t N, const float* c, int64_t c_step, const float* rows, int n) {
    using hla::cpu::kVec;
    using hla::cpu::load;
    using hla::cpu::splat;
    using hla::cpu::store;
    using hla::cpu::vf;
    int64_t e = 0;
    for (; e + 4 * kVec <= N; e += 4 * kVec) {
        vf acc[4];
        for (int v = 0; v < 4; ++v) acc[v] = load(x + e + v * kVec);
        for (int m = 0; m < n; ++m) {
            const vf a = splat(c[m * c_step]);
            const float* r = rows + m * N + e;
            for (int v = 0; v < 4; ++v) acc[v] -= a * load(r + v * kVec);
        }
        for (int v = 0; v < 4; ++v) store(x + e + v * kVec, acc[v]);
    }
    for (; e + kVec <= N; e += kVec) {
        vf acc = load(x + e);
        for (int m = 0; m < n; ++m) acc -= splat(c[m * c_step]) * load(rows + m * N + e);
        store(x + e, acc);
    }
    for (; e < N; ++e) {
        float acc = x[e];
        for (int m = 0; m < n; ++m) acc -= c[m * c_step] * rows[m * N + e];
        x[e] = acc;
    }
}

// (I + A) X = B in place (X holds B on entry), A strictly lower triangular (ld kChunk), X [L, N].
// Blocked: the rows of block I first take −A[I, 0:i0] X[0:i0] as one matrix product, then the
// 16 × 16 diagonal block is a short forward substitution.
void solve_unit_lower(int L, int64_t N, const float* A, float* X) {
    for (int i0 = 0; i0 < L; i0 += kBlock) {
        const int i1 = std::min(L, i0 + kBlock);
        if (i0 > 0) gemm(i1 - i0, N, i0, -1.0f, A + i0 * kChunk, kChunk, 1, X, N, 1.0f, X + i0 * N, N);
        for (int i = i0 + 1; i < i1; ++i) subtract_rows(X + i * N, N, A + i * kChunk + i0, 1, X + i0 * N, i - i0);
    }
}

// (I + A)ᵀ Z = B in place (Z holds B on entry): the same, blocks from the last one backwards.
void solve_unit_lower_t(int L, int64_t N, const float* A, float* Z) {
    const int last0 = (L - 1) / kBlock * kBlock;
    for (int j0 = last0; j0 >= 0; j0 -= kBlock) {
        const int j1 = std::min(L, j0 + kBlock);
        if (j1 < L) gemm(j1 - j0, N, L - j1, -1.0f, A + j1 * kChunk + j0, 1, kChunk, Z + j1 * N, N, 1.0f, Z + j0 * N, N);
        for (int j = j1 - 2; j >= j0; --j)
            subtract_rows(Z + j * N, N, A + (j + 1) * kChunk + j, kChunk, Z + (j + 1) * N, j1 - j - 1);
    }
}

// ---- lane-wise helpers ---------------------------------------------------------------------------
// Elementwise code written once for a vector of kVec lanes and for one float (a row's tail when K is
// not a multiple of kVec): for_lanes calls f(lane_zero, c) for each piece starting at channel c.
inline void ld(const float* p, hla::cpu::vf& x) { x = hla::cpu::load(p); }
inline void ld(const float* p, float& x) { x = *p; }
inline void st(float* p, hla::cpu::vf x) { hla::cpu::store(p, x); }
inline void st(float* p, float x) { *p = x; }
inline hla::cpu::vf exp_lanes(hla::cpu::vf x) { return hla::cpu::exp_vec(x); }
inline float exp_lanes(float x) { return hla::cpu::exp_scalar(x); }
inline hla::cpu::vf ones(hla::cpu::vf) { return hla::cpu::splat(1.0f); }
inline float ones(float) { return 1.0f; }

// One row of a running product of decays, x[at] = x[prev] · factor[0] while the run goes on, else
// `start` (the run's first row); stored and returned. prev is the neighbouring row the run comes from
// (the row above when sweeping down a chunk, below when sweeping up); factor is read only when used.
template <class T>
T extend_run(float* x, int64_t at, int64_t prev, const float* factor, bool goes_on, T start) {
    T v = start;
    if (goes_on) {
        T p, a;
        ld(x + prev, p);
        ld(factor, a);
        v = p * a;
    }
    st(x + at, v);
    return v;
}

template <class F>
void for_lanes(int64_t K, F&& f) {
    int64_t c = 0;
    for (; c + hla::cpu::kVec <= K; c += hla::cpu::kVec) f(hla::cpu::vf{}, c);
    for (; c < K; ++c) f(0.0f, c);
}

// ---- decayed products ---------------------------------------------------------------------------
// E_ij = ⟨x_i, y_j⟩_b over the lower triangle (diag: j ≤ i, else j < i), zero above.
// apply:   out_i += Σ_j E_ij y_j ⊙ exp(b_i − b_j)      (∂/∂x of Σ dE ⊙ E, with dE as E)
// apply_t: out_j += Σ_i E_ij x_i ⊙ exp(b_i − b_j)      (∂/∂y)

// Scalar decay: Γ_ij = exp(b_i − b_j) = exp(Σ_{j<t≤i} g_t) on the lower triangle, so every product is
// a masked matmul. Row i is row i − 1 plus g_i (each entry a sum of the gates between j and i, never a
// difference of cumulative sums), so the rows are whole-vector adds; −∞ above the diagonal makes those
// entries exp(−∞) = 0. Only entries j ≤ i are read (mask_scale), so row i takes the exp of its
// vectors up to the diagonal and keeps the log values beyond them: half the exps of the whole
// [L, kChunk] array at L = 32 (48 vectors instead of 128).
void scalar_gamma(const float* g, int L, float* gamma) {
    constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
    std::fill(gamma, gamma + kChunk, kMinusInf);
    gamma[0] = 0.0f;
    for (int i = 1; i < L; ++i) {
        const float* prev = gamma + (i - 1) * kChunk;
        float* row = gamma + i * kChunk;
        for (int j = 0; j < kChunk; ++j) row[j] = prev[j] + g[i];
        row[i] = 0.0f;
    }
    constexpr int kV = int(hla::cpu::kVec);
    for (int i = 0; i < L; ++i) exp_inplace(gamma + i * kChunk, std::min(kChunk, (i / kV + 1) * kV));
}

// End of the diagonal 16-token block that row i belongs to: the lower-triangular products read a
// row's entries up to there and no further, so masks need to clear nothing beyond it.
int block_end(int i, int L) { return std::min(L, (i / kBlock + 1) * kBlock); }

// E (ld kChunk) ← mask ⊙ Γ ⊙ E  (gamma == nullptr: Γ = 1, the mask alone)
void mask_scale(float* E, const float* gamma, int L, bool diag) {
    for (int i = 0; i < L; ++i) {
        float* e = E + i * kChunk;
        const int end = diag ? i + 1 : i;
        if (gamma) {
            const float* g = gamma + i * kChunk;
            for (int j = 0; j < end; ++j) e[j] *= g[j];
        }
        std::fill(e + end, e + block_end(i, L), 0.0f);
    }
}

// One decayed product E = ⟨x_i, y_j⟩_b to form (diag: j ≤ i, else j < i); the chunk's P and D share y = k.
struct ScoreTarget {
    const float* x;
    bool diag;
    float* E;
};

template <bool kVector>
struct Decayed;

template <>
struct Decayed<false> {
    // yt: y transposed [K, L] (the callers' y is always the chunk's k, transposed once per chunk).
    static void scores(std::initializer_list<ScoreTarget> targets, const float* /*y*/, const float* yt, int L, int64_t K,
                       Workspace& w) {
        for (const ScoreTarget& t : targets) {
            lower_scores(L, K, t.x, yt, L, t.E);
            mask_scale(t.E, w.gamma, L, t.diag);
        }
    }
    // E is already masked and decayed by scores/mask_scale in the scalar case.
    static void apply(const float* E, const float* y, int L, int64_t K, const float*, bool, float* out, Workspace&) {
        lower_apply(L, K, 1.0f, E, y, 1.0f, out);
    }
    static void apply_t(const float* E, const float* x, int L, int64_t K, const float*, bool, float* out, Workspace&) {
        lower_apply_t(L, K, 1.0f, E, x, 1.0f, out);
    }
    // For gradients dE arrive undecayed: decay them once so apply/apply_t are plain products.
    static void prepare_grad(float* dE, int L, bool diag, Workspace& w) { mask_scale(dE, w.gamma, L, diag); }
};

template <>
struct Decayed<true> {
    // Calls f(i, j, e) for the pairs of the diagonal block [i0, i1) (j ≤ i, or j < i without diag),
    // with e[c] = exp(b_ic − b_jc) = Π_{j<t≤i} a_tc, a = exp(g) (w.ea): a product of at most 15 factors
    // ≤ 1, as accurate as exp of the sum and without an exp per pair.
    template <class F>
    static void for_diag_pairs(int64_t K, int i0, int i1, bool diag, Workspace& w, F&& f) {
        float* e = w.row.data();
        const float* a = w.ea.data();
        for (int i = i0; i < i1; ++i) {
            std::fill(e, e + K, 1.0f);
            for (int j = i; j >= i0; --j) {
                if (j < i || diag) f(i, j, e);
                for (int64_t c = 0; c < K; ++c) e[c] *= a[j * K + c];
            }
        }
    }

    // Every decay factor of the chunk, as running products of the per-token decays a = exp(g)
    // (w.ea): exp(Σ_{j<t≤i} g_t) = Π_{j<t≤i} a_t, factors ≤ 1 whose product keeps a few ulps of
    // relative error (or underflows to 0 where the true factor does), with one exp per token and
    // channel instead of one per factor. For the chunk (as decay_factors forms them for one decay
    // per token):
    //   w.eb [L, K]:    Π_{t≤i} a_t = exp(b_i);   w.ebar [L, K]:  Π_{i<t<L} a_t = exp(b_last − b_i)
    // and per 16-token block I (r = i0 − 1, the token before it):
    //   w.within_block [L, K]:   row i of block I holds Π_{i0≤t≤i} a_t = exp(b_i − b_r) — the
    //                            off-diagonal "after" factor and the diagonal blocks' W
    //   w.before [I][i0, K]:     row j < i0 holds Π_{j<t≤r} a_t = exp(b_r − b_j)
    // With them the scaled operands: w.kbar = k ⊙ ebar, w.qg = q ⊙ eb (with_q), w.kg = k ⊙ eb (with_kg).
    // One sweep down the chunk and one back up, a row at a time: a row's factors are read back from L1
    // while the next row is formed, where a pass over the [L, K] arrays per factor ran at L2 speed
    // (~12% of the GLA forward, 2 threads).
    static void prepare(const ChunkView& c, Workspace& w, bool with_q, bool with_kg) {
        const int L = c.L;
        const int64_t K = c.K;
        float* ea = w.ea.data();
        float* eb = w.eb.data();
        float* ebar = w.ebar.data();
        float* W = w.within_block.data();
        for (int i = 0; i < L; ++i) {
            const bool block_start = i % kBlock == 0;
            for_lanes(K, [&](auto lanes, int64_t ch) {
                using T = decltype(lanes);
                const int64_t t = i * K + ch;
                T a;
                ld(c.g + t, a);
                a = exp_lanes(a);
                st(ea + t, a);
                const T e = extend_run(eb, t, t - K, ea + t, i > 0, a);
                extend_run(W, t, t - K, ea + t, !block_start, a);
                if (with_q) {
                    T q;
                    ld(c.q + t, q);
                    st(w.qg.data() + t, q * e);
                }
                if (with_kg) {
                    T k;
                    ld(c.k + t, k);
                    st(w.kg.data() + t, k * e);
                }
            });
            if (i % kBlock == kBlock - 1 || i == L - 1) finish_diagonal_block(i / kBlock * kBlock, i + 1, K, w);
        }
        for (int i = L - 1; i >= 0; --i) {
            for_lanes(K, [&](auto lanes, int64_t ch) {
                using T = decltype(lanes);
                const int64_t t = i * K + ch;
                const T e = extend_run(ebar, t, t + K, ea + t + K, i < L - 1, ones(lanes));
                T k;
                ld(c.k + t, k);
                st(w.kbar.data() + t, k * e);
                // Row i of the "before" factors of every later block.
                for (int i0 = (i / kBlock + 1) * kBlock; i0 < L; i0 += kBlock)
                    extend_run(before(w, i0, K), t, t + K, ea + t + K, i < i0 - 1, ones(lanes));
            });
        }
    }

    // A diagonal block whose decays are shallow, Π_{block} exp(g_tc) ≥ kMinBlockDecay in every channel,
    // is computed as a matrix product like the off-diagonal blocks, factored around its first token:
    // exp(b_i − b_j) = W_i / W_j with W_i = Π_{i0≤t≤i} exp(g_t) ≤ 1 (w.within_block). 1/W_j ≥ 1 is
    // then bounded by 1/kMinBlockDecay, so nothing overflows; W is a product of per-token decays, not
    // the exp of a sum, so W_i / W_j carries the same few-ulp relative error as the per-pair products
    // however deep the block's decays are. A deeper block (a gate near −1000, say) keeps the per-pair
    // products of for_diag_pairs.
    static constexpr float kMinBlockDecay = 1e-20f;

    // Once W of block [i0, i1) is formed: whether it is shallow, and then 1/W.
    static void finish_diagonal_block(int i0, int i1, int64_t K, Workspace& w) {
        const float* W = w.within_block.data();
        float* W_inv = w.within_block_inv.data();
        const float* last = W + (i1 - 1) * K;
        bool shallow = true;
        for (int64_t c = 0; c < K; ++c) shallow &= last[c] >= kMinBlockDecay;
        w.block_as_product[size_t(i0 / kBlock)] = shallow;
        if (shallow)
            for (int64_t t = i0 * K; t < i1 * K; ++t) W_inv[t] = 1.0f / W[t];
    }

    static bool as_product(const Workspace& w, int i0) { return w.block_as_product[size_t(i0 / kBlock)] != 0; }

    // w.diag_block [n, n] (ld kBlock) ← E's diagonal block [i0, i1) with the excluded pairs (j > i, and
    // j = i without diag) set to zero, whatever E holds there.
    static const float* masked_diagonal_block(const float* E, int i0, int i1, bool diag, Workspace& w) {
        float* D = w.diag_block.data();
        for (int i = i0; i < i1; ++i)
            for (int j = i0; j < i1; ++j)
                D[(i - i0) * kBlock + (j - i0)] = (j < i || (diag && j == i)) ? E[i * kChunk + j] : 0.0f;
        return D;
    }
    static float* before(Workspace& w, int i0, int64_t K) { return w.before.data() + (i0 / kBlock) * kChunk * K; }

    // dst[t] = src[t] ⊙ f[t] over n rows of K
    static void mul_rows(const float* src, const float* f, int n, int64_t K, float* dst) {
        for (int64_t t = 0; t < n * K; ++t) dst[t] = src[t] * f[t];
    }

    static void scores(std::initializer_list<ScoreTarget> targets, const float* y, const float* /*yt*/, int L, int64_t K,
                       Workspace& w) {
        // Row block I = [i0, i1) in one matrix product [x_I ⊙ W_I] [y_J ⊙ exp(b_r − b_J) | y_I ⊘ W_I]ᵀ: the
        // blocks before it (J, factored around r = i0 − 1, where W_I = exp(b_I − b_r)) and, when shallow,
        // its diagonal block; both share the left factor, and every target shares the right one.
        for (int i0 = 0; i0 < L; i0 += kBlock) {
            const int i1 = std::min(L, i0 + kBlock), n = i1 - i0;
            const bool product = as_product(w, i0);
            const int cols = product ? i1 : i0;
            if (cols > 0) {
                if (i0 > 0) mul_rows(y, before(w, i0, K), i0, K, w.blk_out.data());
                if (product) mul_rows(y + i0 * K, w.within_block_inv.data() + i0 * K, n, K, w.blk_out.data() + i0 * K);
                transpose(w.blk_out.data(), cols, K, K, w.blk_yt.data());  // [K, cols]
                for (const ScoreTarget& t : targets) {
                    mul_rows(t.x + i0 * K, w.within_block.data() + i0 * K, n, K, w.blk_x.data());
                    gemm(n, cols, K, 1.0f, w.blk_x.data(), K, 1, w.blk_yt.data(), cols, 0.0f, t.E + i0 * kChunk, kChunk);
                }
            }
            for (const ScoreTarget& t : targets) {
                float* E = t.E;
                if (product) {
                    for (int i = i0; i < i1; ++i) std::fill(E + i * kChunk + (t.diag ? i + 1 : i), E + i * kChunk + i1, 0.0f);
                } else {
                    for (int i = i0; i < i1; ++i) std::fill(E + i * kChunk + i0, E + i * kChunk + i1, 0.0f);
                    for_diag_pairs(K, i0, i1, t.diag, w, [&](int i, int j, const float* e) {
                        E[i * kChunk + j] = hla::cpu::dot3(t.x + i * K, y + j * K, e, K);
                    });
                }
            }
        }
    }

    static void apply(const float* E, const float* y, int L, int64_t K, const float* /*g*/, bool diag, float* out,
                      Workspace& w) {
        for (int i0 = 0; i0 < L; i0 += kBlock) {
            const int i1 = std::min(L, i0 + kBlock), n = i1 - i0;
            if (as_product(w, i0)) {
                // out_I += W_I ⊙ (E_II [y_I ⊘ W_I])
                const float* D = masked_diagonal_block(E, i0, i1, diag, w);
                mul_rows(y + i0 * K, w.within_block_inv.data() + i0 * K, n, K, w.blk_out.data());
                gemm(n, K, n, 1.0f, D, kBlock, 1, w.blk_out.data(), K, 0.0f, w.blk_x.data(), K);
                const float* W = w.within_block.data() + i0 * K;
                for (int64_t t = 0; t < n * K; ++t) out[i0 * K + t] += w.blk_x[t] * W[t];
            } else {
                for_diag_pairs(K, i0, i1, diag, w, [&](int i, int j, const float* e) {
                    const float eij = E[i * kChunk + j];
                    for (int64_t c = 0; c < K; ++c) out[i * K + c] += eij * y[j * K + c] * e[c];
                });
            }
            if (i0 == 0) continue;
            mul_rows(y, before(w, i0, K), i0, K, w.blk_out.data());  // y_J ⊙ exp(b_r − b_J)
            gemm(i1 - i0, K, i0, 1.0f, E + i0 * kChunk, kChunk, 1, w.blk_out.data(), K, 0.0f, w.blk_x.data(), K);
            const float* after = w.within_block.data() + i0 * K;  // exp(b_I − b_r)
            for (int64_t t = 0; t < (i1 - i0) * K; ++t) out[i0 * K + t] += w.blk_x[t] * after[t];
        }
    }

    static void apply_t(const float* E, const float* x, int L, int64_t K, const float* /*g*/, bool diag, float* out,
                        Workspace& w) {
        for (int i0 = 0; i0 < L; i0 += kBlock) {
            const int i1 = std::min(L, i0 + kBlock), n = i1 - i0;
            if (as_product(w, i0)) {
                // out_I += (E_IIᵀ [x_I ⊙ W_I]) ⊘ W_I
                const float* D = masked_diagonal_block(E, i0, i1, diag, w);
                mul_rows(x + i0 * K, w.within_block.data() + i0 * K, n, K, w.blk_x.data());
                gemm(n, K, n, 1.0f, D, 1, kBlock, w.blk_x.data(), K, 0.0f, w.blk_out.data(), K);
                const float* W_inv = w.within_block_inv.data() + i0 * K;
                for (int64_t t = 0; t < n * K; ++t) out[i0 * K + t] += w.blk_out[t] * W_inv[t];
            } else {
                for_diag_pairs(K, i0, i1, diag, w, [&](int i, int j, const float* e) {
                    const float eij = E[i * kChunk + j];
                    for (int64_t c = 0; c < K; ++c) out[j * K + c] += eij * x[i * K + c] * e[c];
                });
            }
            if (i0 == 0) continue;
            mul_rows(x + i0 * K, w.within_block.data() + i0 * K, i1 - i0, K, w.blk_x.data());  // x_I ⊙ exp(b_I − b_r)
            // [i0, K] = E[I, 0:i0]ᵀ · x̃_I
            gemm(i0, K, i1 - i0, 1.0f, E + i0 * kChunk, 1, kChunk, w.blk_x.data(), K, 0.0f, w.blk_out.data(), K);
            const float* before_r = before(w, i0, K);  // exp(b_r − b_J)
            for (int64_t t = 0; t < i0 * K; ++t) out[t] += w.blk_out[t] * before_r[t];
        }
    }

    static void prepare_grad(float* dE, int L, bool diag, Workspace&) {
        for (int i = 0; i < L; ++i) std::fill(dE + i * kChunk + (diag ? i + 1 : i), dE + i * kChunk + block_end(i, L), 0.0f);
    }
};

// One decay per token: eb ← exp(b) (≤ 1) and ebar ← exp(b_last − b) = exp(Σ_{j<t<L} g_t) (≤ 1), [L],
// exps of same-sign sums. (Vector decay: Decayed<true>::prepare.)
void scalar_decay_factors(const ChunkView& c, Workspace& w) {
    const int L = c.L;
    float* eb = w.eb.data();
    float* ebar = w.ebar.data();
    std::copy(c.b, c.b + L, eb);
    exp_inplace(eb, L);
    ebar[L - 1] = 0.0f;
    for (int j = L - 2; j >= 0; --j) ebar[j] = ebar[j + 1] + c.g[j + 1];
    exp_inplace(ebar, L);
}

// out [L, K] = x ⊙ f, f [L] broadcast over the row.
void scale_rows(const float* x, const float* f, int L, int64_t K, float* out) {
    for (int i = 0; i < L; ++i)
        for (int64_t c = 0; c < K; ++c) out[i * K + c] = x[i * K + c] * f[i];
}

// db (∂/∂b, [L, K] or [L]) += sign · x ⊙ dx
template <bool kVector>
void add_db(float* db, const float* x, const float* dx, int L, int64_t K, float sign) {
    for (int i = 0; i < L; ++i) {
        if (kVector) {
            for (int64_t c = 0; c < K; ++c) db[i * K + c] += sign * x[i * K + c] * dx[i * K + c];
        } else {
            db[i] += sign * hla::cpu::dot(x + i * K, dx + i * K, K);
        }
    }
}

// The operands of a chunk's matrix products that chunk_common forms: X (the solve's result in w.x for
// the delta rule, the chunk's v itself for the additive update) and the decay-scaled q ⊙ γ, k ⊙ γ and
// k ⊙ γ_last ⊘ γ (in the workspace, or the chunk's q and k themselves without decay).
struct Operands {
    const float *x, *qg, *kg, *kbar;
};

// The intra-chunk quantities both passes need: decay factors, the scaled operands, the scores, and X.
template <bool kVector, bool kDelta>
Operands chunk_common(const ChunkView& c, const float* S0, Workspace& w, bool with_output) {
    const int L = c.L;
    const int64_t K = c.K, V = c.V;
    Operands op{nullptr, w.qg.data(), w.kg.data(), w.kbar.data()};
    if constexpr (kVector) {
        Decayed<true>::prepare(c, w, with_output, kDelta);
    } else if (c.decay) {
        scalar_gamma(c.g, L, w.gamma_lower.data());
        w.gamma = w.gamma_lower.data();
        scalar_decay_factors(c, w);
        scale_rows(c.k, w.ebar.data(), L, K, w.kbar.data());
        if (with_output) scale_rows(c.q, w.eb.data(), L, K, w.qg.data());
        if (kDelta) scale_rows(c.k, w.eb.data(), L, K, w.kg.data());
    } else {
        // Without decay every factor is exp(0) = 1 exactly: the same results without the exps and
        // the scaled copies (eb, ebar are still set, the backward reads them).
        w.gamma = nullptr;
        std::fill(w.eb.begin(), w.eb.begin() + L, 1.0f);
        std::fill(w.ebar.begin(), w.ebar.begin() + L, 1.0f);
        op = Operands{nullptr, c.q, c.k, c.k};
    }
    if constexpr (!kVector) transpose(c.k, L, K, K, w.kt.data());
    // P = ⟨q, k⟩_b (j ≤ i) for the output, D = ⟨k, k⟩_b (j < i) for the delta rule, in one pass over k.
    const ScoreTarget P{c.q, true, w.p.data()}, D{c.k, false, w.d.data()};
    if (with_output && kDelta) Decayed<kVector>::scores({P, D}, c.k, w.kt.data(), L, K, w);
    else if (with_output) Decayed<kVector>::scores({P}, c.k, w.kt.data(), L, K, w);
    else if (kDelta) Decayed<kVector>::scores({D}, c.k, w.kt.data(), L, K, w);
    if constexpr (kDelta) {
        // Y = V − (K ⊙ γ) S0
        std::copy(c.v, c.v + L * V, w.y.data());
        gemm(L, V, K, -1.0f, op.kg, K, 1, S0, V, 1.0f, w.y.data(), V);
        // A = diag(β) D
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < i; ++j) w.a[i * kChunk + j] = c.beta[i] * w.d[i * kChunk + j];
        // (I + A) X = diag(β) Y
        float* X = w.x.data();
        for (int i = 0; i < L; ++i)
            for (int64_t e = 0; e < V; ++e) X[i * V + e] = c.beta[i] * w.y[i * V + e];
        solve_unit_lower(L, V, w.a.data(), X);
        op.x = X;
    } else {
        op.x = c.v;
    }
    return op;
}

}  // namespace

template <bool kVector, bool kDelta>
void chunk_forward(const ChunkView& c, float* S, float* o, Workspace& w) {
    const int L = c.L;
    const int64_t K = c.K, V = c.V;
    const Operands op = chunk_common<kVector, kDelta>(c, S, w, o != nullptr);
    const float* X = op.x;
    if (o) {
        // O = (Q ⊙ γ) S0 + P X
        gemm(L, V, K, 1.0f, op.qg, K, 1, S, V, 0.0f, o, V);
        lower_apply(L, V, 1.0f, w.p.data(), X, 1.0f, o);
    }
    // S_C = diag(γ_last) S0 + (K ⊙ γ_last ⊘ γ)ᵀ X, with γ_last the product's beta (one per state row for
    // vector decay), so S is read and written once: a separate scaling pass over the 64 KiB state was
    // ~2% of a chunk.
    const float* eb_last = w.eb.data() + (L - 1) * (kVector ? K : 1);
    if (kVector && c.decay) gemm_row_beta(K, V, L, 1.0f, op.kbar, 1, K, X, V, eb_last, S, V);
    else gemm(K, V, L, 1.0f, op.kbar, 1, K, X, V, c.decay ? eb_last[0] : 1.0f, S, V);
}

// dg for scalar decay, exactly. With b the in-chunk cumulative sum, dg_t = Σ_{i ≥ t} ∂/∂b_i; in that sum
// every intra-chunk pair (i, j) with both ends at or after t appears twice with opposite signs. Adding
// them and letting them cancel in fp32 leaves rounding noise where the true dg_t is 0 (a token whose
// decay underflows), and in-kernel gates amplify it (dA_log = Σ dg · g, with g = −1000). So dg_t is
// assembled from the terms that really depend on g_t, each of which carries the factor exp(g_t):
//   dg_t = Σ_{i ≥ t} Σ_{j < t} F_ij + Σ_{i ≥ t} u_i + Σ_{j < t} w_j + c_last
// with F = dE ⊙ E over the decayed products P and D, u_i = ⟨Qγ_i, dQγ_i⟩ + ⟨Kγ_i, dKγ_i⟩,
// w_j = ⟨K̄_j, dK̄_j⟩ and c_last = γ_L ⟨S₀, dS_C⟩.
struct ScalarDgTerms {
    ScalarDgTerms(Workspace& ws, int L_) : L(L_), F(ws.f.data()), u(ws.u.data()), w(ws.w.data()) {
        for (int i = 0; i < L; ++i) std::fill(F + i * kChunk, F + i * kChunk + L, 0.0f);
        std::fill(u, u + L, 0.0f);
        std::fill(w, w + L, 0.0f);
    }
    // F += dE ⊙ E on the strict lower triangle (E decayed, dE not yet).
    void add_pairs(const float* dE, const float* E) {
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < i; ++j) F[i * kChunk + j] += dE[i * kChunk + j] * E[i * kChunk + j];
    }
    void finish(float* dg) const {
        std::fill(dg, dg + L, c_last);
        for (int i = 0; i < L; ++i) {
            float before = 0;  // Σ_{j < t} F_ij
            for (int t = 0; t <= i; ++t) {
                dg[t] += before;
                before += F[i * kChunk + t];
            }
        }
        float suffix = 0;
        for (int t = L - 1; t >= 0; --t) {
            suffix += u[t];
            dg[t] += suffix;
        }
        float prefix = 0;
        for (int t = 0; t < L; ++t) {
            dg[t] += prefix;
            prefix += w[t];
        }
    }
    int L;
    float* F;
    float* u;
    float* w;
    float c_last = 0;
};

// Backward of the strictly lower decayed products E_ij = ⟨x_i, y_j⟩_b (E = D or P without its
// diagonal), given dE (masked and decayed here, in place): w.tmp1 ← ∂/∂x, w.tmp2 ← ∂/∂y, and their
// share of ∂/∂b — into db for vector decay, into the exact dg terms for one decay per token.
template <bool kVector>
void decayed_product_grad(float* dE, const float* E, const float* x, const float* y, int L, int64_t K, float* db,
                          ScalarDgTerms& sdg, Workspace& w) {
    if constexpr (!kVector) sdg.add_pairs(dE, E);
    Decayed<kVector>::prepare_grad(dE, L, false, w);
    std::fill(w.tmp1.begin(), w.tmp1.begin() + L * K, 0.0f);
    std::fill(w.tmp2.begin(), w.tmp2.begin() + L * K, 0.0f);
    Decayed<kVector>::apply(dE, y, L, K, nullptr, false, w.tmp1.data(), w);
    Decayed<kVector>::apply_t(dE, x, L, K, nullptr, false, w.tmp2.data(), w);
    if constexpr (kVector) {
        add_db<kVector>(db, x, w.tmp1.data(), L, K, +1.0f);
        add_db<kVector>(db, y, w.tmp2.data(), L, K, -1.0f);
    }
}

template <bool kVector, bool kDelta>
void chunk_backward(const ChunkView& c, const float* S0, const float* dO, float* dS, float* dq, float* dk, float* dv,
                    float* dg, float* dbeta, Workspace& w) {
    const int L = c.L;
    const int64_t K = c.K, V = c.V;
    const int64_t width = kVector ? K : 1;
    const Operands op = chunk_common<kVector, kDelta>(c, S0, w, true);
    const float* X = op.x;
    // Vector decay: ∂/∂b accumulates in db, and dg is its reverse cumulative sum at the end.
    // Scalar decay: dg is assembled exactly from the terms that straddle each token (see scalar_dg).
    float* db = w.db.data();
    std::fill(db, db + L * width, 0.0f);
    ScalarDgTerms sdg(w, L);

    // dX = Pᵀ dO + Kbar dS_C
    lower_apply_t(L, V, 1.0f, w.p.data(), dO, 0.0f, w.dx.data());
    gemm(L, V, K, 1.0f, op.kbar, K, 1, dS, V, 1.0f, w.dx.data(), V);
    // dP = dO Xᵀ ; dQγ = dO S0ᵀ ; dKbar = X dS_Cᵀ
    transpose(X, L, V, V, w.xt.data());
    lower_scores(L, V, dO, w.xt.data(), L, w.dp.data());
    transpose(S0, K, V, V, w.s0t.data());
    gemm(L, K, V, 1.0f, dO, V, 1, w.s0t.data(), K, 0.0f, w.dqg.data(), K);
    transpose(dS, K, V, V, w.dst.data());
    gemm(L, K, V, 1.0f, X, V, 1, w.dst.data(), K, 0.0f, w.dkbar.data(), K);

    // dS0 = diag(γ_last) dS_C + Qγᵀ dO  (− Kγᵀ dY below); ∂b_last += γ_last ⊙ rowsum(S0 ⊙ dS_C)
    const float* eb_last = w.eb.data() + (L - 1) * width;
    float* db_last = db + (L - 1) * width;
    for (int64_t r = 0; r < K; ++r) {
        const float s = hla::cpu::dot(S0 + r * V, dS + r * V, V);
        const float f = kVector ? eb_last[r] : eb_last[0];
        if (kVector) db_last[r] += f * s; else sdg.c_last += f * s;
        for (int64_t e = 0; e < V; ++e) dS[r * V + e] *= f;
    }
    gemm(K, V, L, 1.0f, op.qg, 1, K, dO, V, 1.0f, dS, V);

    if constexpr (kDelta) {
        // (I + A)ᵀ Z = dX
        float* Z = w.z.data();
        std::copy(w.dx.begin(), w.dx.begin() + L * V, Z);
        solve_unit_lower_t(L, V, w.a.data(), Z);
        // dA = −Z Xᵀ (strict lower part used); dβ_i = ⟨Z_i, Y_i⟩ + Σ_j dA_ij D_ij; dD = diag(β) dA
        lower_scores(L, V, Z, w.xt.data(), L, w.da.data());  // = −dA on and below the diagonal
        for (int i = 0; i < L; ++i)
            for (int j = 0; j < i; ++j) w.da[i * kChunk + j] = -w.da[i * kChunk + j];
        for (int i = 0; i < L; ++i) {
            float s = hla::cpu::dot(Z + i * V, w.y.data() + i * V, V);
            for (int j = 0; j < i; ++j) s += w.da[i * kChunk + j] * w.d[i * kChunk + j];
            dbeta[i] = s;
            for (int j = 0; j < i; ++j) w.da[i * kChunk + j] *= c.beta[i];
            for (int64_t e = 0; e < V; ++e) w.dy[i * V + e] = c.beta[i] * Z[i * V + e];
        }
        std::copy(w.dy.begin(), w.dy.begin() + L * V, dv);
        // Y = V − Kγ S0: dKγ = −dY S0ᵀ ; dS0 −= Kγᵀ dY
        gemm(L, K, V, -1.0f, w.dy.data(), V, 1, w.s0t.data(), K, 0.0f, w.dkg.data(), K);
        gemm(K, V, L, -1.0f, op.kg, 1, K, w.dy.data(), V, 1.0f, dS, V);
        // D = ⟨k, k⟩_b (strict)
        decayed_product_grad<kVector>(w.da.data(), w.d.data(), c.k, c.k, L, K, db, sdg, w);
        for (int64_t i = 0; i < L * K; ++i) dk[i] += w.tmp1[i] + w.tmp2[i];
        // Kγ = K ⊙ γ
        for (int i = 0; i < L; ++i)
            for (int64_t ch = 0; ch < K; ++ch)
                dk[i * K + ch] += w.dkg[i * K + ch] * (kVector ? w.eb[i * K + ch] : w.eb[i]);
        if constexpr (kVector) add_db<kVector>(db, op.kg, w.dkg.data(), L, K, +1.0f);
        else add_db<kVector>(sdg.u, op.kg, w.dkg.data(), L, K, +1.0f);
    } else {
        std::copy(w.dx.begin(), w.dx.begin() + L * V, dv);
        std::fill(dbeta, dbeta + L, 0.0f);
    }

    // P = ⟨q, k⟩_b. Its diagonal (e_ii = 1) adds +dP_ii q_i⊙k_i and −dP_ii q_i⊙k_i to ∂b_i, which cancel
    // exactly; taking it out of the decayed products keeps fp32 rounding noise out of dg.
    for (int i = 0; i < L; ++i) w.diag[i] = w.dp[i * kChunk + i];
    decayed_product_grad<kVector>(w.dp.data(), w.p.data(), c.q, c.k, L, K, db, sdg, w);
    for (int i = 0; i < L; ++i) {
        const float dpii = w.diag[i];
        for (int64_t ch = 0; ch < K; ++ch) {
            dq[i * K + ch] += w.tmp1[i * K + ch] + dpii * c.k[i * K + ch];
            dk[i * K + ch] += w.tmp2[i * K + ch] + dpii * c.q[i * K + ch];
        }
    }
    // Qγ = Q ⊙ γ
    for (int i = 0; i < L; ++i)
        for (int64_t ch = 0; ch < K; ++ch)
            dq[i * K + ch] += w.dqg[i * K + ch] * (kVector ? w.eb[i * K + ch] : w.eb[i]);
    add_db<kVector>(kVector ? db : sdg.u, op.qg, w.dqg.data(), L, K, +1.0f);
    // Kbar = K ⊙ exp(b_last − b): ∂k += dKbar ⊙ ebar ; ∂b_j −= dKbar_j ⊙ Kbar_j ; ∂b_last += Σ_j dKbar_j ⊙ Kbar_j
    for (int i = 0; i < L; ++i)
        for (int64_t ch = 0; ch < K; ++ch)
            dk[i * K + ch] += w.dkbar[i * K + ch] * (kVector ? w.ebar[i * K + ch] : w.ebar[i]);
    if constexpr (kVector) {
        // (the last token's two terms cancel exactly, so it is skipped)
        for (int i = 0; i < L - 1; ++i) {
            for (int64_t ch = 0; ch < K; ++ch) {
                const float t = w.dkbar[i * K + ch] * op.kbar[i * K + ch];
                db[i * K + ch] -= t;
                db_last[ch] += t;
            }
        }
        // ∂/∂g_t = Σ_{i ≥ t} ∂/∂b_i (b is the in-chunk cumulative sum)
        std::copy(db, db + L * K, dg);
        for (int i = L - 2; i >= 0; --i)
            for (int64_t ch = 0; ch < K; ++ch) dg[i * K + ch] += dg[(i + 1) * K + ch];
    } else {
        add_db<false>(sdg.w, op.kbar, w.dkbar.data(), L, K, +1.0f);
        sdg.finish(dg);
    }
}

template void chunk_forward<false, false>(const ChunkView&, float*, float*, Workspace&);
template void chunk_forward<false, true>(const ChunkView&, float*, float*, Workspace&);
template void chunk_forward<true, false>(const ChunkView&, float*, float*, Workspace&);
template void chunk_forward<true, true>(const ChunkView&, float*, float*, Workspace&);
template void chunk_backward<false, false>(const ChunkView&, const float*, const float*, float*, float*, float*, float*,
                                           float*, float*, Workspace&);
template void chunk_backward<false, true>(const ChunkView&, const float*, const float*, float*, float*, float*, float*,
                                          float*, float*, Workspace&);
template void chunk_backward<true, false>(const ChunkView&, const float*, const float*, float*, float*, float*, float*,
                                          float*, float*, Workspace&);
template void chunk_backward<true, true>(const ChunkView&, const float*, const float*, float*, float*, float*, float*,
                                         float*, float*, Workspace&);

}  // namespace hla::linear::cpu
