// hla — the decode step on the CPU: the per-token recurrence straight on the cached state, which for
// T = 1 is both the exact algorithm and the fastest (the state is read and written once per token;
// a chunked pass would have nothing to amortise).
//
//   delta:    o = (a⊙q)ᵀS + (q·k) u  with  p = (a⊙k)ᵀS, u = β (v − p);  S ← diag(a) S + k uᵀ
//   additive: o = (a⊙q)ᵀS + (q·k) v;                                    S ← diag(a) S + k vᵀ
// The state goes through in panels of 64 columns. The delta rule sweeps a panel twice (p and o, then
// the update, which needs all of p's panel): the panel, K rows × 64 floats = 32 KiB at K = 128, is
// still in L1 for the second sweep, so S crosses L2 once in each direction per token, which is what
// bounds this step. The additive update needs one sweep.
// No allocation: the scratch lives on the stack (see DecodeScratch).
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

// One token on one head's state S [K, V]: o ← (a⊙q)ᵀS + (q·k) u, S ← diag(a) S + k uᵀ, with
// u = β (v − (a⊙k)ᵀS) for the delta rule and u = v for the additive update.
template <bool kDelta>
void step_state(float* S, const float* a, const float* k, const float* aq, const float* ak, const float* v, float beta,
                float qk, int64_t K, int64_t V, float* o) {
    using hla::cpu::load;
    using hla::cpu::splat;
    using hla::cpu::store;
    constexpr int P = 4;  // vectors per panel: 64 columns
    int64_t e0 = 0;
    for (; e0 + P * kVec <= V; e0 += P * kVec) {
        vf acc_o[P] = {}, u[P];
        if constexpr (kDelta) {
            vf acc_p[P] = {};
            for (int64_t c = 0; c < K; ++c) {
                const float* row = S + c * V + e0;
                const vf wq = splat(aq[c]), wk = splat(ak[c]);
                for (int j = 0; j < P; ++j) {
                    const vf r = load(row + j * kVec);
                    acc_o[j] += wq * r;
                    acc_p[j] += wk * r;
                }
            }
            for (int j = 0; j < P; ++j) u[j] = splat(beta) * (load(v + e0 + j * kVec) - acc_p[j]);
            for (int64_t c = 0; c < K; ++c) {
                float* row = S + c * V + e0;
                const vf ac = splat(a[c]), kc = splat(k[c]);
                for (int j = 0; j < P; ++j) store(row + j * kVec, ac * load(row + j * kVec) + kc * u[j]);
            }
        } else {
            for (int j = 0; j < P; ++j) u[j] = load(v + e0 + j * kVec);
            for (int64_t c = 0; c < K; ++c) {
                float* row = S + c * V + e0;
                const vf wq = splat(aq[c]), ac = splat(a[c]), kc = splat(k[c]);
                for (int j = 0; j < P; ++j) {
                    const vf r = load(row + j * kVec);
                    acc_o[j] += wq * r;
                    store(row + j * kVec, ac * r + kc * u[j]);
                }
            }
        }
        for (int j = 0; j < P; ++j) store(o + e0 + j * kVec, acc_o[j] + splat(qk) * u[j]);
    }
    // Column tail (V not a multiple of 64): the same, one column at a time.
    for (int64_t e = e0; e < V; ++e) {
        float oe = 0, pe = 0;
        for (int64_t c = 0; c < K; ++c) {
            oe += aq[c] * S[c * V + e];
            pe += ak[c] * S[c * V + e];
        }
        const float ue = kDelta ? beta * (v[e] - pe) : v[e];
        for (int64_t c = 0; c < K; ++c) S[c * V + e] = a[c] * S[c * V + e] + k[c] * ue;
        o[e] = oe + qk * ue;
    }
}

// Per-token scratch: q̂, k̂, log decay, a, a⊙q, a⊙k ([K] each), v and o ([V] each). On the stack for
// head dims up to 512 (16 KiB), so a decode step never touches the heap; larger heads fall back to a
// per-thread buffer that grows once.
struct DecodeScratch {
    static constexpr int64_t kStackFloats = 6 * 512 + 2 * 512;
    float stack[kStackFloats];
    float *q, *k, *logd, *a, *aq, *ak, *v, *o;

    DecodeScratch(int64_t K, int64_t V) {
        const int64_t need = 6 * K + 2 * V;
        float* base = stack;
        if (need > kStackFloats) {
            thread_local std::vector<float> large;
            if (int64_t(large.size()) < need) large.resize(size_t(need));
            base = large.data();
        }
        for (float** part : {&q, &k, &logd, &a, &aq, &ak}) {
            *part = base;
            base += K;
        }
        v = base;
        o = base + V;
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
        DecodeScratch w(K, V);
        for (int64_t t = 0; t < p.T; ++t) {
            float beta;
            load_token(in, n, t, hv, w.q, w.k, w.v, w.logd, &beta);
            if (vec) {
                std::copy(w.logd, w.logd + K, w.a);
                hla::cpu::exp_inplace(w.a, K);
            } else {
                std::fill(w.a, w.a + K, std::exp(w.logd[0]));
            }
            for (int64_t c = 0; c < K; ++c) {
                w.aq[c] = w.a[c] * w.q[c];
                w.ak[c] = w.a[c] * w.k[c];
            }
            // vectorised: a plain sum is one dependent add per channel (~6% of a head's step at K = 128)
            const float qk = hla::cpu::dot(w.q, w.k, K);
            if (delta)
                step_state<true>(S, w.a, w.k, w.aq, w.ak, w.v, beta, qk, K, V, w.o);
            else
                step_state<false>(S, w.a, w.k, w.aq, w.ak, w.v, beta, qk, K, V, w.o);
            write_row(o, token_offset(o, n, t, hv), w.o, V);
        }
    });
}

}  // namespace hla::linear::cpu
