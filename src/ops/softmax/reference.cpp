// hla — the softmax family's oracle: plain loops in fp64, one (sequence, query head) at a time.
//
// Every path (CPU, CUDA, decode) is compared against this file. It gathers one head's rows into fp64
// arrays, applies the definition of SPECS.md §2 literally, and scatters the results back.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "core/checks.hpp"
#include "ops/softmax/problem.hpp"

namespace hla::softmax::reference {

namespace {

// How intermediate values are rounded: identity for the fp64 oracle, dtype rounding for "the
// reference run in precision P" (whose scores are also rounded to fp32, the accumulation precision).
using Round = std::function<double(double)>;
struct Rounding {
    Round value;        // probabilities fed to a matmul, outputs, dS, gradients
    bool f32_scores;    // scores as an fp32 accumulator holds them
};

double identity(double x) { return x; }

// One (sequence, query head) in fp64. Query t sits at key position offset + t.
struct Head {
    int64_t Lq = 0, Lk = 0, offset = 0, D = 0;
    std::vector<double> q, k, v;  // [Lq, D], [Lk, D], [Lk, D]
    std::vector<double> g;        // [Lk] log forget gate per key position (empty: none)
    std::vector<double> z;        // [Lq, D] output-gate logits (empty: none)
};

struct HeadOut {
    std::vector<double> o, lse;  // [Lq, D], [Lq]
};

struct HeadGrads {
    std::vector<double> dq, dk, dv, dg, dz;  // [Lq, D], [Lk, D], [Lk, D], [Lk], [Lq, D]
};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The scores of query t over its visible keys [lo, hi): s_tj = scale q_t·k_j + Σ_{s=j+1..pos} g_s.
void scores(const Head& h, double scale, bool causal, int64_t window, int64_t t, int64_t& lo, int64_t& hi,
            std::vector<double>& s, bool f32_scores) {
    const int64_t pos = h.offset + t;
    visible_keys(causal, window, pos, h.Lk, lo, hi);
    s.assign(size_t(hi - lo), 0.0);
    double bias = 0;  // Σ_{s=j+1..pos} g_s, accumulated from j = pos downwards
    if (!h.g.empty())
        for (int64_t s2 = hi; s2 <= pos && s2 < h.Lk; ++s2) bias += h.g[size_t(s2)];  // non-causal never has g
    for (int64_t j = hi - 1; j >= lo; --j) {
        double dot = 0;
        for (int64_t d = 0; d < h.D; ++d) dot += h.q[size_t(t * h.D + d)] * h.k[size_t(j * h.D + d)];
        s[size_t(j - lo)] = f32_scores ? double(float(scale * dot + bias)) : scale * dot + bias;
        if (!h.g.empty()) bias += h.g[size_t(j)];
    }
}

HeadOut head_forward(const Head& h, double scale, bool causal, int64_t window, const Rounding& rounding) {
    const Round& rnd = rounding.value;
    HeadOut out;
    out.o.assign(size_t(h.Lq * h.D), 0.0);
    out.lse.assign(size_t(h.Lq), kNegInf);
    std::vector<double> s;
    for (int64_t t = 0; t < h.Lq; ++t) {
        int64_t lo, hi;
        scores(h, scale, causal, window, t, lo, hi, s, rounding.f32_scores);
        if (hi == lo) continue;  // a row that sees no key: o = 0, lse = −inf
        double m = kNegInf;
        for (double x : s) m = std::max(m, x);
        double l = 0;
        for (double& x : s) {
            x = std::exp(x - m);
            l += x;
        }
        for (int64_t j = lo; j < hi; ++j) {
            const double pj = rnd(s[size_t(j - lo)]);  // a tensor-core kernel feeds P in the input dtype
            for (int64_t d = 0; d < h.D; ++d) out.o[size_t(t * h.D + d)] += pj * h.v[size_t(j * h.D + d)];
        }
        for (int64_t d = 0; d < h.D; ++d) {
            double& o = out.o[size_t(t * h.D + d)];
            o /= l;
            if (!h.z.empty()) o *= sigmoid(h.z[size_t(t * h.D + d)]);
            o = rnd(o);
        }
        out.lse[size_t(t)] = m + std::log(l);
    }
    return out;
}

// The hand-derived reverse pass. With P the probabilities, a_t the pre-gate output and
// dA_t = dO_t ⊙ σ(z_t):  dV = Pᵀ dA,  dP = dA Vᵀ,  dS = P ⊙ (dP − rowsum(P ⊙ dP)),
// dQ = scale dS K,  dK = scale dSᵀ Q,  dz = dO ⊙ a ⊙ σ'(z),  dg_s = Σ_t Σ_{j < s ≤ pos_t} dS_tj.
HeadGrads head_backward(const Head& h, const std::vector<double>& dout, double scale, bool causal, int64_t window,
                        const Rounding& rounding) {
    const Round& rnd = rounding.value;
    HeadGrads gr;
    const int64_t D = h.D;
    gr.dq.assign(size_t(h.Lq * D), 0.0);
    gr.dk.assign(size_t(h.Lk * D), 0.0);
    gr.dv.assign(size_t(h.Lk * D), 0.0);
    gr.dg.assign(size_t(h.Lk), 0.0);
    gr.dz.assign(size_t(h.Lq * D), 0.0);
    std::vector<double> s, da(static_cast<size_t>(D)), a(static_cast<size_t>(D));
    for (int64_t t = 0; t < h.Lq; ++t) {
        int64_t lo, hi;
        scores(h, scale, causal, window, t, lo, hi, s, rounding.f32_scores);
        double m = kNegInf;
        for (double x : s) m = std::max(m, x);
        double l = 0;
        for (double x : s) l += std::exp(x - m);
        std::vector<double> p(s.size());
        for (size_t j = 0; j < s.size(); ++j) p[j] = std::exp(s[j] - m) / l;
        std::fill(a.begin(), a.end(), 0.0);
        for (int64_t j = lo; j < hi; ++j)
            for (int64_t d = 0; d < D; ++d) a[size_t(d)] += p[size_t(j - lo)] * h.v[size_t(j * D + d)];
        for (int64_t d = 0; d < D; ++d) {
            const double dot = dout[size_t(t * D + d)];
            if (h.z.empty()) {
                da[size_t(d)] = dot;
            } else {
                const double sg = sigmoid(h.z[size_t(t * D + d)]);
                da[size_t(d)] = dot * sg;
                gr.dz[size_t(t * D + d)] = rnd(dot * rnd(a[size_t(d)] * sg) * (1 - sg));
            }
        }
        // rowsum(P ⊙ dP) = Σ_d dO ⊙ o: evaluated from the output as stored (rounded in precision mode),
        // which is what a FlashAttention backward does.
        double rowdot = 0;
        for (int64_t d = 0; d < D; ++d) {
            const double sg = h.z.empty() ? 1.0 : sigmoid(h.z[size_t(t * D + d)]);
            rowdot += dout[size_t(t * D + d)] * rnd(a[size_t(d)] * sg);
        }
        std::vector<double> dp(s.size());
        for (int64_t j = lo; j < hi; ++j) {
            double x = 0;
            for (int64_t d = 0; d < D; ++d) x += da[size_t(d)] * h.v[size_t(j * D + d)];
            dp[size_t(j - lo)] = x;
        }
        const int64_t pos = h.offset + t;
        double prefix = 0;  // Σ_{j' < s} dS_tj' while s walks up to pos
        for (int64_t j = lo; j < hi; ++j) {
            const double pj = rnd(p[size_t(j - lo)]);
            const double ds = rnd(p[size_t(j - lo)] * (dp[size_t(j - lo)] - rowdot));
            for (int64_t d = 0; d < D; ++d) {
                gr.dv[size_t(j * D + d)] += pj * da[size_t(d)];
                gr.dq[size_t(t * D + d)] += scale * ds * h.k[size_t(j * D + d)];
                gr.dk[size_t(j * D + d)] += scale * ds * h.q[size_t(t * D + d)];
            }
            prefix += ds;
            // dS_tj reaches every g_s with j < s ≤ pos: add the running prefix to g_{j+1}.
            if (!h.g.empty() && j + 1 <= pos) {
                const int64_t s_next = j + 1;
                const int64_t s_end = (j + 1 < hi) ? j + 2 : pos + 1;  // the last visible key spreads to pos
                for (int64_t s2 = s_next; s2 < s_end; ++s2) gr.dg[size_t(s2)] += prefix;
            }
        }
    }
    return gr;
}

// ---- gathering one head of a forward Problem ---------------------------------------------------------

Head gather_forward(const Problem& p, const Sequence& sq, int64_t h) {
    const SoftmaxForwardArgs& a = p.args;
    Head hd;
    hd.Lq = hd.Lk = sq.len;
    hd.D = p.D;
    hd.q.resize(size_t(sq.len * p.D));
    hd.k.resize(size_t(sq.len * p.D));
    hd.v.resize(size_t(sq.len * p.D));
    const int64_t kvh = h / p.G;
    for (int64_t t = 0; t < sq.len; ++t) {
        const int64_t tok = sq.start + t;
        for (int64_t d = 0; d < p.D; ++d) {
            hd.q[size_t(t * p.D + d)] = load_as_double(a.q.data, a.q.dtype, token_offset(a.q, sq.batch, tok, h) + d);
            hd.k[size_t(t * p.D + d)] = load_as_double(a.k.data, a.k.dtype, token_offset(a.k, sq.batch, tok, kvh) + d);
            hd.v[size_t(t * p.D + d)] = load_as_double(a.v.data, a.v.dtype, token_offset(a.v, sq.batch, tok, kvh) + d);
        }
    }
    if (a.g.defined()) {
        hd.g.resize(size_t(sq.len));
        for (int64_t t = 0; t < sq.len; ++t)
            hd.g[size_t(t)] = load_as_double(a.g.data, a.g.dtype, token_offset(a.g, sq.batch, sq.start + t, h));
    }
    if (a.gate.defined()) {
        hd.z.resize(size_t(sq.len * p.D));
        for (int64_t t = 0; t < sq.len; ++t)
            for (int64_t d = 0; d < p.D; ++d)
                hd.z[size_t(t * p.D + d)] =
                    load_as_double(a.gate.data, a.gate.dtype, token_offset(a.gate, sq.batch, sq.start + t, h) + d);
    }
    return hd;
}

void forward_impl(const Problem& p, const Rounding& rnd) {
    const SoftmaxForwardArgs& a = p.args;
    for (const Sequence& sq : p.seqs)
        for (int64_t h = 0; h < p.HQ; ++h) {
            const Head hd = gather_forward(p, sq, h);
            const HeadOut out = head_forward(hd, p.scale, p.cfg.causal, p.window, rnd);
            for (int64_t t = 0; t < sq.len; ++t) {
                for (int64_t d = 0; d < p.D; ++d)
                    store_from_double(a.o.data, a.o.dtype, token_offset(a.o, sq.batch, sq.start + t, h) + d,
                                      out.o[size_t(t * p.D + d)]);
                if (a.lse.defined())
                    a.lse.ptr<float>()[sq.batch * a.lse.stride[0] + h * a.lse.stride[1] +
                                       (sq.start + t) * a.lse.stride[2]] = float(out.lse[size_t(t)]);
            }
        }
}

void backward_impl(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g, const Rounding& rounding) {
    const Round& rnd = rounding.value;
    for (const Sequence& sq : p.seqs) {
        std::vector<double> dk(size_t(sq.len * p.HKV * p.D), 0.0), dv(dk.size(), 0.0);
        for (int64_t h = 0; h < p.HQ; ++h) {
            const Head hd = gather_forward(p, sq, h);
            std::vector<double> dout(size_t(sq.len * p.D));
            for (int64_t t = 0; t < sq.len; ++t)
                for (int64_t d = 0; d < p.D; ++d)
                    dout[size_t(t * p.D + d)] =
                        load_as_double(d_o.data, d_o.dtype, token_offset(d_o, sq.batch, sq.start + t, h) + d);
            const HeadGrads gr = head_backward(hd, dout, p.scale, p.cfg.causal, p.window, rounding);
            const int64_t kvh = h / p.G;
            for (int64_t t = 0; t < sq.len; ++t) {
                const int64_t tok = sq.start + t;
                for (int64_t d = 0; d < p.D; ++d) {
                    if (g.dq.defined())
                        store_from_double(g.dq.data, g.dq.dtype, token_offset(g.dq, sq.batch, tok, h) + d,
                                          rnd(gr.dq[size_t(t * p.D + d)]));
                    if (g.dgate.defined())
                        store_from_double(g.dgate.data, g.dgate.dtype, token_offset(g.dgate, sq.batch, tok, h) + d,
                                          gr.dz[size_t(t * p.D + d)]);
                    dk[size_t((t * p.HKV + kvh) * p.D + d)] += gr.dk[size_t(t * p.D + d)];
                    dv[size_t((t * p.HKV + kvh) * p.D + d)] += gr.dv[size_t(t * p.D + d)];
                }
                if (g.dg.defined())
                    g.dg.ptr<float>()[token_offset(g.dg, sq.batch, tok, h)] = float(gr.dg[size_t(t)]);
            }
        }
        for (int64_t t = 0; t < sq.len; ++t)
            for (int64_t kvh = 0; kvh < p.HKV; ++kvh)
                for (int64_t d = 0; d < p.D; ++d) {
                    const int64_t tok = sq.start + t;
                    if (g.dk.defined())
                        store_from_double(g.dk.data, g.dk.dtype, token_offset(g.dk, sq.batch, tok, kvh) + d,
                                          rnd(dk[size_t((t * p.HKV + kvh) * p.D + d)]));
                    if (g.dv.defined())
                        store_from_double(g.dv.data, g.dv.dtype, token_offset(g.dv, sq.batch, tok, kvh) + d,
                                          rnd(dv[size_t((t * p.HKV + kvh) * p.D + d)]));
                }
    }
}

Rounding rounding_to(DType dtype) {
    return {[dtype](double x) { return double(round_to_dtype(float(x), dtype)); }, true};
}

const Rounding kExact{identity, false};

}  // namespace

void forward(const Problem& p) { forward_impl(p, kExact); }
void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g) { backward_impl(p, d_o, g, kExact); }
void forward_in_precision(const Problem& p, DType dtype) { forward_impl(p, rounding_to(dtype)); }
void backward_in_precision(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g, DType dtype) {
    backward_impl(p, d_o, g, rounding_to(dtype));
}

// ---- KV cache ---------------------------------------------------------------------------------------

void decode(const DecodeProblem& p) {
    const SoftmaxKVCacheArgs& a = p.args;
    const std::vector<int64_t> lens =
        a.cache_seqlens.defined() ? detail::read_indices(a.cache_seqlens) : std::vector<int64_t>(size_t(p.N), p.capacity);
    const std::vector<int64_t> slot_of = a.cache_batch_idx.defined() ? detail::read_indices(a.cache_batch_idx)
                                                                     : std::vector<int64_t>();
    // Cache row of token t of sequence n, as (slot or page, row): the one place the layout is spelled out.
    auto locate = [&](int64_t n, int64_t t, int64_t& slot, int64_t& row) {
        if (p.paged()) {
            slot = a.block_table.ptr<int32_t>()[n * a.block_table.stride[0] + (t / p.page_size) * a.block_table.stride[1]];
            row = t % p.page_size;
        } else {
            slot = slot_of.empty() ? n : slot_of[size_t(n)];
            row = t;
        }
    };
    for (int64_t n = 0; n < p.N; ++n) {
        const int64_t L = lens[size_t(n)];
        if (p.append) {
            for (int64_t t = 0; t < p.TQ; ++t) {
                int64_t slot, row;
                locate(n, L + t, slot, row);
                for (int64_t kvh = 0; kvh < p.HKV; ++kvh)
                    for (int64_t d = 0; d < p.D; ++d) {
                        store_from_double(a.k_cache.data, a.k_cache.dtype, token_offset(a.k_cache, slot, row, kvh) + d,
                                          load_as_double(a.k.data, a.k.dtype, token_offset(a.k, n, t, kvh) + d));
                        store_from_double(a.v_cache.data, a.v_cache.dtype, token_offset(a.v_cache, slot, row, kvh) + d,
                                          load_as_double(a.v.data, a.v.dtype, token_offset(a.v, n, t, kvh) + d));
                    }
                if (a.g_cache.defined())
                    for (int64_t h = 0; h < p.HQ; ++h)
                        a.g_cache.ptr<float>()[token_offset(a.g_cache, slot, row, h)] =
                            float(load_as_double(a.g.data, a.g.dtype, token_offset(a.g, n, t, h)));
            }
        }
        const int64_t Lk = L + (p.append ? p.TQ : 0);
        for (int64_t h = 0; h < p.HQ; ++h) {
            const int64_t kvh = h / p.G;
            Head hd;
            hd.Lq = p.TQ;
            hd.Lk = Lk;
            hd.offset = Lk - p.TQ;
            hd.D = p.D;
            hd.q.resize(size_t(p.TQ * p.D));
            hd.k.resize(size_t(Lk * p.D));
            hd.v.resize(size_t(Lk * p.D));
            for (int64_t t = 0; t < p.TQ; ++t)
                for (int64_t d = 0; d < p.D; ++d)
                    hd.q[size_t(t * p.D + d)] = load_as_double(a.q.data, a.q.dtype, token_offset(a.q, n, t, h) + d);
            if (a.g_cache.defined()) hd.g.resize(size_t(Lk));
            for (int64_t j = 0; j < Lk; ++j) {
                int64_t slot, row;
                locate(n, j, slot, row);
                for (int64_t d = 0; d < p.D; ++d) {
                    hd.k[size_t(j * p.D + d)] =
                        load_as_double(a.k_cache.data, a.k_cache.dtype, token_offset(a.k_cache, slot, row, kvh) + d);
                    hd.v[size_t(j * p.D + d)] =
                        load_as_double(a.v_cache.data, a.v_cache.dtype, token_offset(a.v_cache, slot, row, kvh) + d);
                }
                if (a.g_cache.defined()) hd.g[size_t(j)] = a.g_cache.ptr<float>()[token_offset(a.g_cache, slot, row, h)];
            }
            if (a.gate.defined()) {
                hd.z.resize(size_t(p.TQ * p.D));
                for (int64_t t = 0; t < p.TQ; ++t)
                    for (int64_t d = 0; d < p.D; ++d)
                        hd.z[size_t(t * p.D + d)] =
                            load_as_double(a.gate.data, a.gate.dtype, token_offset(a.gate, n, t, h) + d);
            }
            const HeadOut out = head_forward(hd, p.scale, p.cfg.causal, p.window, kExact);
            for (int64_t t = 0; t < p.TQ; ++t) {
                for (int64_t d = 0; d < p.D; ++d)
                    store_from_double(a.o.data, a.o.dtype, token_offset(a.o, n, t, h) + d, out.o[size_t(t * p.D + d)]);
                if (a.lse.defined())
                    a.lse.ptr<float>()[n * a.lse.stride[0] + h * a.lse.stride[1] + t * a.lse.stride[2]] =
                        float(out.lse[size_t(t)]);
            }
        }
    }
}

}  // namespace hla::softmax::reference
