// hla — the decode step on the CPU: the per-token recurrence straight on the cached state, which for
// T = 1 is both the exact algorithm and the fastest (the state is read and written once per token;
// a chunked pass would have nothing to amortise).
//
//   delta:    o = (a⊙q)ᵀS + (q·k) u  with  p = (a⊙k)ᵀS, u = β (v − p);  S ← diag(a) S + k uᵀ
//   additive: o = (a⊙q)ᵀS + (q·k) v;                                    S ← diag(a) S + k vᵀ
// Both read S once to form p and o, then update it in one read-modify-write pass.
// No allocation: per-thread scratch is sized on first use and reused.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu_math.hpp"
#include "core/checks.hpp"
#include "hla/threading.hpp"
#include "ops/linear/cpu_io.hpp"

namespace hla::linear::cpu {

using hla::cpu::kVec;
using hla::cpu::vf;

namespace {

// out_m[0:V] = Σ_c w_m[c] · S[c, 0:V] for M weight vectors in one sweep over S (S is read once).
// Columns go in panels of 4 vectors so the 4·M accumulators stay in registers across the c loop.
template <int M>
inline void weighted_row_sums(const float* S, const float* const* w, int64_t K, int64_t V, float* const* out) {
    constexpr int P = 4;
    int64_t e0 = 0;
    for (; e0 + P * kVec <= V; e0 += P * kVec) {
        vf acc[M][P] = {};
        for (int64_t c = 0; c < K; ++c) {
            const float* row = S + c * V + e0;
            vf r[P];
            for (int p = 0; p < P; ++p) r[p] = hla::cpu::load(row + p * kVec);
            for (int m = 0; m < M; ++m) {
                const vf wm = hla::cpu::splat(w[m][c]);
                for (int p = 0; p < P; ++p) acc[m][p] += wm * r[p];
            }
        }
        for (int m = 0; m < M; ++m)
            for (int p = 0; p < P; ++p) hla::cpu::store(out[m] + e0 + p * kVec, acc[m][p]);
    }
    // Column tail (V not a multiple of 64).
    for (int m = 0; m < M; ++m) std::fill(out[m] + e0, out[m] + V, 0.0f);
    for (int64_t c = 0; c < K; ++c)
        for (int m = 0; m < M; ++m)
            for (int64_t e = e0; e < V; ++e) out[m][e] += w[m][c] * S[c * V + e];
}

// S[c, :] ← a[c] · S[c, :] + k[c] · u
inline void decay_and_update(float* S, const float* a, const float* k, const float* u, int64_t K, int64_t V) {
    for (int64_t c = 0; c < K; ++c) {
        const vf ac = hla::cpu::splat(a[c]), kc = hla::cpu::splat(k[c]);
        float* row = S + c * V;
        int64_t e = 0;
        for (; e + kVec <= V; e += kVec) hla::cpu::store(row + e, ac * hla::cpu::load(row + e) + kc * hla::cpu::load(u + e));
        for (; e < V; ++e) row[e] = a[c] * row[e] + k[c] * u[e];
    }
}

struct DecodeScratch {
    std::vector<float> q, k, v, logd, a, aq, ak, p, o;
    void size(int64_t K, int64_t V) {
        if (int64_t(q.size()) == K && int64_t(v.size()) == V) return;
        for (auto* b : {&q, &k, &logd, &a, &aq, &ak}) b->assign(size_t(K), 0.0f);
        for (auto* b : {&v, &p, &o}) b->assign(size_t(V), 0.0f);
    }
};

int64_t slot_of(const TensorView& idx, int64_t n) {
    if (!idx.defined()) return n;
    const int64_t at = n * idx.stride[0];
    return idx.dtype == DType::I64 ? idx.ptr<int64_t>()[at] : int64_t(idx.ptr<int32_t>()[at]);
}

}  // namespace

void decode(const DecodeProblem& p) {
    const InputViews in = input_views(p);
    const int64_t K = p.K, V = p.V, HV = p.HV, KV = K * V;
    const bool vec = p.cfg.decay == Decay::Vector;
    const bool delta = p.cfg.update == Update::Delta;
    const TensorView& o = p.args.o;
    // Slot indices are checked here (host memory, cheap) so a bad index is an error, not a stray write.
    for (int64_t n = 0; n < p.N; ++n) {
        const int64_t slot = slot_of(p.args.state_indices, n);
        HLA_CHECK(slot < p.slots, p.op, ": state_indices: entry ", n, " is ", slot, ", expected < S = ", p.slots,
                  " (negative skips the sequence)");
    }
    parallel_for(p.N * HV, [&](int64_t task) {
        const int64_t n = task / HV, hv = task % HV;
        const int64_t slot = slot_of(p.args.state_indices, n);
        if (slot < 0) return;
        float* S = p.args.state.ptr<float>() + (slot * HV + hv) * KV;
        thread_local DecodeScratch w;
        w.size(K, V);
        for (int64_t t = 0; t < p.T; ++t) {
            float beta;
            load_token(in, n, t, hv, w.q.data(), w.k.data(), w.v.data(), w.logd.data(), &beta);
            if (vec) {
                std::copy(w.logd.begin(), w.logd.end(), w.a.begin());
                hla::cpu::exp_inplace(w.a.data(), K);
            } else {
                std::fill(w.a.begin(), w.a.end(), std::exp(w.logd[0]));
            }
            float qk = 0;
            for (int64_t c = 0; c < K; ++c) {
                w.aq[c] = w.a[c] * w.q[c];
                w.ak[c] = w.a[c] * w.k[c];
                qk += w.q[c] * w.k[c];
            }
            float* u = w.v.data();  // additive: u = v
            if (delta) {
                const float* weights[2] = {w.aq.data(), w.ak.data()};
                float* sums[2] = {w.o.data(), w.p.data()};
                weighted_row_sums<2>(S, weights, K, V, sums);
                for (int64_t e = 0; e < V; ++e) u[e] = beta * (w.v[e] - w.p[e]);
            } else {
                const float* weights[1] = {w.aq.data()};
                float* sums[1] = {w.o.data()};
                weighted_row_sums<1>(S, weights, K, V, sums);
            }
            for (int64_t e = 0; e < V; ++e) w.o[e] += qk * u[e];
            decay_and_update(S, w.a.data(), w.k.data(), u, K, V);
            write_row(o, token_offset(o, n, t, hv), w.o.data(), V);
        }
    });
}

}  // namespace hla::linear::cpu
