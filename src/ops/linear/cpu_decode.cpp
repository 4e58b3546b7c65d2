// hla — the decode step on the CPU: the per-token recurrence straight on the cached state, which for
// T = 1 is both the exact algorithm and the fastest (the state is read and written once per token;
// a chunked pass would have nothing to amortise).
//
//   delta:    o = (a⊙q)ᵀS + (q·k) u  with  p = (a⊙k)ᵀS, u = β (v − p);  S ← diag(a) S + k uᵀ
//   additive: o = (a⊙q)ᵀS + (q·k) v;                                    S ← diag(a) S + k vᵀ
// Both read S once to form p and o, then update it in one read-modify-write pass.
// No allocation: per-thread scratch is sized on first use and reused.
#include <algorithm>
#include <vector>

#include "core/cpu_math.hpp"
#include "core/checks.hpp"
#include "hla/threading.hpp"
#include "ops/linear/cpu_io.hpp"

namespace hla::linear::cpu {

using hla::cpu::kVec;
using hla::cpu::vf;

namespace {

// out[0:V] = Σ_c w[c] · S[c, 0:V]   (V a multiple of kVec on the fast path)
inline void weighted_row_sum(const float* S, const float* w, int64_t K, int64_t V, float* out) {
    std::fill(out, out + V, 0.0f);
    for (int64_t c = 0; c < K; ++c) {
        const float wc = w[c];
        const float* row = S + c * V;
        int64_t e = 0;
        for (; e + kVec <= V; e += kVec) hla::cpu::store(out + e, hla::cpu::load(out + e) + hla::cpu::splat(wc) * hla::cpu::load(row + e));
        for (; e < V; ++e) out[e] += wc * row[e];
    }
}

// Two weighted sums in one sweep over S (S is read once).
inline void weighted_row_sum2(const float* S, const float* w1, const float* w2, int64_t K, int64_t V, float* out1,
                              float* out2) {
    std::fill(out1, out1 + V, 0.0f);
    std::fill(out2, out2 + V, 0.0f);
    for (int64_t c = 0; c < K; ++c) {
        const vf a = hla::cpu::splat(w1[c]), b = hla::cpu::splat(w2[c]);
        const float* row = S + c * V;
        int64_t e = 0;
        for (; e + kVec <= V; e += kVec) {
            const vf r = hla::cpu::load(row + e);
            hla::cpu::store(out1 + e, hla::cpu::load(out1 + e) + a * r);
            hla::cpu::store(out2 + e, hla::cpu::load(out2 + e) + b * r);
        }
        for (; e < V; ++e) {
            out1[e] += w1[c] * row[e];
            out2[e] += w2[c] * row[e];
        }
    }
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
            for (int64_t c = 0; c < K; ++c) w.a[c] = hla::cpu::exp_scalar(vec ? w.logd[c] : w.logd[0]);
            float qk = 0;
            for (int64_t c = 0; c < K; ++c) {
                w.aq[c] = w.a[c] * w.q[c];
                w.ak[c] = w.a[c] * w.k[c];
                qk += w.q[c] * w.k[c];
            }
            float* u = w.v.data();  // additive: u = v
            if (delta) {
                weighted_row_sum2(S, w.aq.data(), w.ak.data(), K, V, w.o.data(), w.p.data());
                for (int64_t e = 0; e < V; ++e) u[e] = beta * (w.v[e] - w.p[e]);
            } else {
                weighted_row_sum(S, w.aq.data(), K, V, w.o.data());
            }
            for (int64_t e = 0; e < V; ++e) w.o[e] += qk * u[e];
            decay_and_update(S, w.a.data(), w.k.data(), u, K, V);
            write_row(o, token_offset(o, n, t, hv), w.o.data(), V);
        }
    });
}

}  // namespace hla::linear::cpu
