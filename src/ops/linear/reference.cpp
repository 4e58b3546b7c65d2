// hla — the linear family's oracle: the per-token recurrence of SPECS.md §1, plain and readable.
//
// Every other backend (chunked CPU, CUDA) is tested against this file, so it favours being obviously
// right over being fast: one value head of one sequence at a time, one token at a time.
//
//   S ← D_t S                                    (decay the key rows)
//   delta:    u = β_t (v_t − Sᵀ k_t);  S ← S + k_t uᵀ
//   additive: S ← S + k_t v_tᵀ
//   o_t = Sᵀ (scale · q_t)
//
// The arithmetic type R is double for the oracle and float for "the reference run in precision P"
// (forward_in_precision), which also rounds the state and the outputs to P after every token.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/checks.hpp"
#include "ops/linear/activations.hpp"
#include "ops/linear/problem.hpp"

namespace hla::linear::reference {
namespace {

// The backward keeps the state at the start of every 64-token segment and recomputes the states
// inside a segment from it: K·V·(T/64 + 64) numbers per head instead of K·V·T (T = 4096, K = V = 128:
// 16 MiB instead of 512 MiB).
constexpr int64_t kSegment = 64;

// The inputs the recurrence reads. Forward views are [B, T, heads, dim] and decode views
// [N, T, heads, dim]; both index the same way (row, token, head).
struct Inputs {
    LinearConfig cfg;
    TensorView q, k, v, g, beta, A_log, dt_bias;
    int64_t K = 0, V = 0, G = 1;
    double scale = 1.0;

    explicit Inputs(const Problem& p)
        : cfg(p.cfg), q(p.args.q), k(p.args.k), v(p.args.v), g(p.args.g), beta(p.args.beta), A_log(p.args.A_log),
          dt_bias(p.args.dt_bias), K(p.K), V(p.V), G(p.G), scale(p.scale) {}
    explicit Inputs(const DecodeProblem& p)
        : cfg(p.cfg), q(p.args.q), k(p.args.k), v(p.args.v), g(p.args.g), beta(p.args.beta), A_log(p.args.A_log),
          dt_bias(p.args.dt_bias), K(p.K), V(p.V), G(p.G), scale(p.scale) {}

    bool delta() const { return cfg.update == Update::Delta; }
    bool gated() const { return cfg.gate_activation != GateActivation::None; }
    // Entries of the gate input per token: one for a scalar gate, K for a vector gate.
    int64_t gate_width() const { return cfg.decay == Decay::Vector ? K : 1; }
};

// Element i of a 1-D view, or (i, c) of a 2-D one.
double at(const TensorView& x, int64_t i, int64_t c = 0) {
    return load_as_double(x.data, x.dtype, i * x.stride[0] + (x.ndim > 1 ? c * x.stride[1] : 0));
}

// One value head of one sequence after the in-kernel transforms, token-major, plus what the
// backward of those transforms needs.
template <class R>
struct HeadSequence {
    int64_t len = 0;
    std::vector<R> q, k;          // [len, K]: q and k, L2-normalised when qk_l2norm (the scale is applied in step)
    std::vector<R> q_norm, k_norm;  // [len]: the denominators ‖q‖, ‖k‖ (1 without qk_l2norm)
    std::vector<R> v;             // [len, V]
    std::vector<R> decay;         // [len, K]: a = exp(log decay) per key channel; empty for Decay::None
    std::vector<R> gate_x;        // [len, gate_width]: gate input x = g (+ dt_bias) of a per-token gate
    std::vector<R> beta_raw, beta;  // [len]: beta as given and β after its activation (delta only)
};

// Reads tokens [start, start + len) of row b for value head hv and applies the in-kernel transforms:
// q/k L2 norm, the gate activation (log decay from g, A_log, dt_bias) and the beta activation.
template <class R>
HeadSequence<R> load_head(const Inputs& in, int64_t b, int64_t start, int64_t len, int64_t hv) {
    const int64_t K = in.K, V = in.V, h = hv / in.G, W = in.gate_width();
    HeadSequence<R> s;
    s.len = len;
    s.q.resize(size_t(len * K));
    s.k.resize(size_t(len * K));
    s.q_norm.assign(size_t(len), R(1));
    s.k_norm.assign(size_t(len), R(1));
    s.v.resize(size_t(len * V));
    if (in.cfg.decay != Decay::None) s.decay.resize(size_t(len * K));
    if (in.cfg.decay == Decay::Scalar || in.cfg.decay == Decay::Vector) s.gate_x.resize(size_t(len * W));
    if (in.delta()) {
        s.beta_raw.resize(size_t(len));
        s.beta.resize(size_t(len));
    }
    for (int64_t i = 0; i < len; ++i) {
        const int64_t t = start + i;
        R* q = &s.q[size_t(i * K)];
        R* k = &s.k[size_t(i * K)];
        const int64_t qo = token_offset(in.q, b, t, h), ko = token_offset(in.k, b, t, h);
        for (int64_t c = 0; c < K; ++c) {
            q[c] = R(load_as_double(in.q.data, in.q.dtype, qo + c * in.q.stride[3]));
            k[c] = R(load_as_double(in.k.data, in.k.dtype, ko + c * in.k.stride[3]));
        }
        if (in.cfg.qk_l2norm) {
            s.q_norm[size_t(i)] = l2norm_denominator(q, K);
            s.k_norm[size_t(i)] = l2norm_denominator(k, K);
            for (int64_t c = 0; c < K; ++c) {
                q[c] /= s.q_norm[size_t(i)];
                k[c] /= s.k_norm[size_t(i)];
            }
        }
        const int64_t vo = token_offset(in.v, b, t, hv);
        for (int64_t j = 0; j < V; ++j)
            s.v[size_t(i * V + j)] = R(load_as_double(in.v.data, in.v.dtype, vo + j * in.v.stride[3]));

        R* a = in.cfg.decay == Decay::None ? nullptr : &s.decay[size_t(i * K)];
        switch (in.cfg.decay) {
            case Decay::None: break;
            case Decay::Fixed: std::fill(a, a + K, R(std::exp(R(at(in.g, hv))))); break;
            case Decay::Scalar:
            case Decay::Vector: {
                // Scalar: one gate for all K channels; Vector: one per channel (g [.., HV, K]).
                const int64_t go = token_offset(in.g, b, t, hv);
                for (int64_t w = 0; w < W; ++w) {
                    R x = R(load_as_double(in.g.data, in.g.dtype, go + (W > 1 ? w * in.g.stride[3] : 0)));
                    R a_log = 0;
                    if (in.gated()) {
                        x += R(at(in.dt_bias, hv, w));
                        a_log = R(at(in.A_log, hv));
                    }
                    s.gate_x[size_t(i * W + w)] = x;
                    const R decay = std::exp(gate_forward(in.cfg, x, a_log));
                    if (W == 1)
                        std::fill(a, a + K, decay);
                    else
                        a[w] = decay;
                }
                break;
            }
        }
        if (in.delta()) {
            const R raw = R(load_as_double(in.beta.data, in.beta.dtype, token_offset(in.beta, b, t, hv)));
            s.beta_raw[size_t(i)] = raw;
            s.beta[size_t(i)] = beta_forward(in.cfg, raw);
        }
    }
    return s;
}

// One token of the recurrence on the state S [K, V] (row-major), writing o [V] when o is given.
// `u` is V numbers of scratch.
template <class R>
void step(const Inputs& in, const HeadSequence<R>& s, int64_t i, R* S, R* o, R* u) {
    const int64_t K = in.K, V = in.V;
    const R* q = &s.q[size_t(i * K)];
    const R* k = &s.k[size_t(i * K)];
    const R* v = &s.v[size_t(i * V)];
    if (!s.decay.empty()) {
        const R* a = &s.decay[size_t(i * K)];
        for (int64_t c = 0; c < K; ++c)
            for (int64_t j = 0; j < V; ++j) S[c * V + j] *= a[c];
    }
    if (in.delta()) {
        // u = β (v − Sᵀk): the correction that makes S map k to v (partially, by β)
        const R beta = s.beta[size_t(i)];
        for (int64_t j = 0; j < V; ++j) {
            R p = 0;
            for (int64_t c = 0; c < K; ++c) p += S[c * V + j] * k[c];
            u[j] = beta * (v[j] - p);
        }
    } else {
        std::copy(v, v + V, u);
    }
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < V; ++j) S[c * V + j] += k[c] * u[j];
    if (o) {
        const R scale = R(in.scale);
        for (int64_t j = 0; j < V; ++j) {
            R acc = 0;
            for (int64_t c = 0; c < K; ++c) acc += S[c * V + j] * (scale * q[c]);
            o[j] = acc;
        }
    }
}

// What a value becomes when stored in `dtype` (identity for f64, and for f32 when R is float).
template <class R>
R round_as(R x, DType dtype) {
    return dtype == DType::F64 ? x : R(round_to_dtype(float(x), dtype));
}

// State [N|S, HV, K, V] f32 view ↔ one head's K×V block.
template <class R>
std::vector<R> read_state(const TensorView& state, int64_t n, int64_t hv, int64_t K, int64_t V) {
    std::vector<R> S(size_t(K * V), R(0));
    if (!state.defined()) return S;
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < V; ++j)
            S[size_t(c * V + j)] = R(load_as_double(
                state.data, state.dtype, n * state.stride[0] + hv * state.stride[1] + c * state.stride[2] + j * state.stride[3]));
    return S;
}

template <class R>
void write_state(const TensorView& state, int64_t n, int64_t hv, int64_t K, int64_t V, const R* S) {
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < V; ++j)
            store_from_double(state.data, state.dtype,
                              n * state.stride[0] + hv * state.stride[1] + c * state.stride[2] + j * state.stride[3],
                              double(S[c * V + j]));
}

// Runs the tokens of `s` from state S, writing o[b, start + i, hv, :]. With `dtype` other than f64
// the state and the outputs are rounded to it after every token.
template <class R>
void run_tokens(const Inputs& in, const HeadSequence<R>& s, const TensorView& o_view, int64_t b, int64_t start,
                int64_t hv, DType dtype, std::vector<R>& S) {
    std::vector<R> o(size_t(in.V)), u(size_t(in.V));
    for (int64_t i = 0; i < s.len; ++i) {
        step(in, s, i, S.data(), o.data(), u.data());
        if (dtype != DType::F64)
            for (R& x : S) x = round_as(x, dtype);
        const int64_t off = token_offset(o_view, b, start + i, hv);
        for (int64_t j = 0; j < in.V; ++j)
            store_from_double(o_view.data, o_view.dtype, off + j * o_view.stride[3], double(round_as(o[size_t(j)], dtype)));
    }
}

template <class R>
void run_forward(const Problem& p, DType dtype) {
    const Inputs in(p);
    for (int64_t n = 0; n < p.N(); ++n) {
        const Sequence& seq = p.seqs[size_t(n)];
        for (int64_t hv = 0; hv < p.HV; ++hv) {
            const HeadSequence<R> s = load_head<R>(in, seq.batch, seq.start, seq.len, hv);
            std::vector<R> S = read_state<R>(p.args.initial_state, n, hv, p.K, p.V);
            run_tokens(in, s, p.args.o, seq.batch, seq.start, hv, dtype, S);
            if (p.args.final_state.defined()) write_state(p.args.final_state, n, hv, p.K, p.V, S.data());
        }
    }
}

// ---- backward --------------------------------------------------------------------------------------

// Sums over tokens (and sequences) of the parameter gradients.
struct ParamGrads {
    std::vector<double> dA_log;    // [HV]
    std::vector<double> ddt_bias;  // [HV, gate_width]
    std::vector<double> dg_fixed;  // [HV], Decay::Fixed
};

// Reverse of step() for token i. S_prev is the state before the token; dS holds the gradient w.r.t.
// the state after it and leaves holding the gradient w.r.t. S_prev. Accumulates into dq, dk (w.r.t.
// the normalised q and k, [K]) and returns dv [V], dβ and d(log decay) [K] of this token.
//
// Forward, named:  S' = D S_prev;  p = S'ᵀk;  u = β(v − p) (delta) or v;  S'' = S' + k uᵀ;  o = S''ᵀ(s q)
// Reverse:         dS'' = dS + s q doᵀ;  dq += s S'' do;  dk += dS'' u;  du = dS''ᵀ k
//                  delta: dβ = ⟨du, v − p⟩;  dv = β du;  dp = −β du;  dS' = dS'' + k dpᵀ;  dk += S' dp
//                  additive: dv = du;  dS' = dS''
//                  d(log a_c) = a_c ⟨S_prev[c], dS'[c]⟩;  dS_prev = D dS'
struct Scratch {
    std::vector<double> S1, S2, p, u, du;
};

void reverse_step(const Inputs& in, const HeadSequence<double>& s, int64_t i, const double* S_prev, const double* d_o,
                  double* dS, double* dq, double* dk, double* dv, double* dbeta, double* dlog_decay, Scratch& w) {
    const int64_t K = in.K, V = in.V;
    const double* q = &s.q[size_t(i * K)];
    const double* k = &s.k[size_t(i * K)];
    const double* v = &s.v[size_t(i * V)];
    const double* a = s.decay.empty() ? nullptr : &s.decay[size_t(i * K)];
    const double scale = in.scale;
    const double beta = in.delta() ? s.beta[size_t(i)] : 1.0;
    double* S1 = w.S1.data();
    double* S2 = w.S2.data();
    double* p = w.p.data();
    double* u = w.u.data();
    double* du = w.du.data();

    // Recompute the token's forward intermediates.
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < V; ++j) S1[c * V + j] = (a ? a[c] : 1.0) * S_prev[c * V + j];
    for (int64_t j = 0; j < V; ++j) {
        p[j] = 0;
        for (int64_t c = 0; c < K; ++c) p[j] += S1[c * V + j] * k[c];
        u[j] = in.delta() ? beta * (v[j] - p[j]) : v[j];
    }
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < V; ++j) S2[c * V + j] = S1[c * V + j] + k[c] * u[j];

    // o = S''ᵀ (s q)
    for (int64_t c = 0; c < K; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < V; ++j) {
            dS[c * V + j] += scale * q[c] * d_o[j];
            acc += S2[c * V + j] * d_o[j];
        }
        dq[c] += scale * acc;
    }
    // S'' = S' + k uᵀ
    for (int64_t c = 0; c < K; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < V; ++j) acc += dS[c * V + j] * u[j];
        dk[c] += acc;
    }
    for (int64_t j = 0; j < V; ++j) {
        du[j] = 0;
        for (int64_t c = 0; c < K; ++c) du[j] += dS[c * V + j] * k[c];
    }
    // u = β (v − p), p = S'ᵀ k
    *dbeta = 0;
    if (in.delta()) {
        for (int64_t j = 0; j < V; ++j) {
            *dbeta += du[j] * (v[j] - p[j]);
            dv[j] = beta * du[j];
        }
        for (int64_t c = 0; c < K; ++c) {
            double acc = 0;
            for (int64_t j = 0; j < V; ++j) {
                const double dp = -beta * du[j];
                dS[c * V + j] += k[c] * dp;
                acc += S1[c * V + j] * dp;
            }
            dk[c] += acc;
        }
    } else {
        std::copy(du, du + V, dv);
    }
    // S' = D S_prev
    for (int64_t c = 0; c < K; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < V; ++j) acc += S_prev[c * V + j] * dS[c * V + j];
        dlog_decay[c] = a ? a[c] * acc : 0.0;
        if (a)
            for (int64_t j = 0; j < V; ++j) dS[c * V + j] *= a[c];
    }
}

// Backward of one value head of one sequence: writes dv, dbeta, dg (per-token decays) and
// dinitial_state, accumulates dq/dk (w.r.t. the normalised q, k; [len, K]) and the parameter sums.
void backward_head(const Problem& p, const Inputs& in, const HeadSequence<double>& s, int64_t n, int64_t hv,
                   const TensorView& d_o_view, const TensorView& d_final_state, const LinearGrads& grads,
                   std::vector<double>& dq, std::vector<double>& dk, ParamGrads& pg) {
    const int64_t K = p.K, V = p.V, len = s.len, W = in.gate_width();
    const Sequence& seq = p.seqs[size_t(n)];
    const size_t KV = size_t(K * V);

    // Forward once, keeping the state at the start of every segment.
    const int64_t segments = (len + kSegment - 1) / kSegment;
    std::vector<double> checkpoints(size_t(segments) * KV);
    std::vector<double> S = read_state<double>(p.args.initial_state, n, hv, K, V);
    std::vector<double> u(static_cast<size_t>(V));
    for (int64_t i = 0; i < len; ++i) {
        if (i % kSegment == 0) std::copy(S.begin(), S.end(), checkpoints.begin() + ptrdiff_t(size_t(i / kSegment) * KV));
        step(in, s, i, S.data(), static_cast<double*>(nullptr), u.data());
    }

    std::vector<double> dS = read_state<double>(d_final_state, n, hv, K, V);
    std::vector<double> states(size_t(kSegment) * KV);  // state before each token of the segment
    std::vector<double> d_o(static_cast<size_t>(V)), dv(static_cast<size_t>(V)), dlog_decay(static_cast<size_t>(K));
    Scratch w{std::vector<double>(KV), std::vector<double>(KV), std::vector<double>(size_t(V)),
              std::vector<double>(size_t(V)), std::vector<double>(size_t(V))};
    for (int64_t seg = segments - 1; seg >= 0; --seg) {
        const int64_t lo = seg * kSegment, hi = std::min(len, lo + kSegment);
        S.assign(checkpoints.begin() + ptrdiff_t(size_t(seg) * KV), checkpoints.begin() + ptrdiff_t(size_t(seg + 1) * KV));
        for (int64_t i = lo; i < hi; ++i) {
            std::copy(S.begin(), S.end(), states.begin() + ptrdiff_t(size_t(i - lo) * KV));
            step(in, s, i, S.data(), static_cast<double*>(nullptr), u.data());
        }
        for (int64_t i = hi - 1; i >= lo; --i) {
            const int64_t b = seq.batch, t = seq.start + i;
            const int64_t oo = token_offset(d_o_view, b, t, hv);
            for (int64_t j = 0; j < V; ++j)
                d_o[size_t(j)] = load_as_double(d_o_view.data, d_o_view.dtype, oo + j * d_o_view.stride[3]);
            double dbeta = 0;
            reverse_step(in, s, i, &states[size_t(i - lo) * KV], d_o.data(), dS.data(), &dq[size_t(i * K)],
                         &dk[size_t(i * K)], dv.data(), &dbeta, dlog_decay.data(), w);

            if (grads.dv.defined()) {
                const int64_t vo = token_offset(grads.dv, b, t, hv);
                for (int64_t j = 0; j < V; ++j)
                    store_from_double(grads.dv.data, grads.dv.dtype, vo + j * grads.dv.stride[3], dv[size_t(j)]);
            }
            if (in.delta() && grads.dbeta.defined())
                store_from_double(grads.dbeta.data, grads.dbeta.dtype, token_offset(grads.dbeta, b, t, hv),
                                  dbeta * beta_derivative(in.cfg, s.beta_raw[size_t(i)]));

            // Decay gradients: d(log a) per channel, then through the gate activation.
            switch (p.cfg.decay) {
                case Decay::None: break;
                case Decay::Fixed:
                    for (int64_t c = 0; c < K; ++c) pg.dg_fixed[size_t(hv)] += dlog_decay[size_t(c)];
                    break;
                case Decay::Scalar:
                case Decay::Vector: {
                    const double a_log = in.gated() ? at(in.A_log, hv) : 0.0;
                    for (int64_t wi = 0; wi < W; ++wi) {
                        // Scalar: the one gate decays all K channels, so its gradient sums them.
                        double dl = 0;
                        if (W == 1)
                            for (int64_t c = 0; c < K; ++c) dl += dlog_decay[size_t(c)];
                        else
                            dl = dlog_decay[size_t(wi)];
                        double d_dx = 1, d_dalog = 0;
                        gate_derivatives(in.cfg, s.gate_x[size_t(i * W + wi)], a_log, &d_dx, &d_dalog);
                        const double dx = d_dx * dl;
                        if (in.gated()) {
                            pg.dA_log[size_t(hv)] += d_dalog * dl;
                            pg.ddt_bias[size_t(hv * W + wi)] += dx;
                        }
                        if (grads.dg.defined())
                            store_from_double(grads.dg.data, grads.dg.dtype,
                                              token_offset(grads.dg, b, t, hv) + (W > 1 ? wi * grads.dg.stride[3] : 0), dx);
                    }
                    break;
                }
            }
        }
    }
    if (grads.dinitial_state.defined()) write_state(grads.dinitial_state, n, hv, K, V, dS.data());
}

// dq, dk of one q/k head: from the normalised vectors back through the L2 norm, then written.
void write_qk_grad(const Inputs& in, const TensorView& view, int64_t b, int64_t start, int64_t h,
                   const std::vector<double>& d_unit, const std::vector<double>& unit, const std::vector<double>& norm,
                   int64_t len) {
    const int64_t K = in.K;
    std::vector<double> dx(static_cast<size_t>(K));
    for (int64_t i = 0; i < len; ++i) {
        std::copy(&d_unit[size_t(i * K)], &d_unit[size_t(i * K)] + K, dx.begin());
        if (in.cfg.qk_l2norm) l2norm_backward(&unit[size_t(i * K)], norm[size_t(i)], dx.data(), K);
        const int64_t off = token_offset(view, b, start + i, h);
        for (int64_t c = 0; c < K; ++c) store_from_double(view.data, view.dtype, off + c * view.stride[3], dx[size_t(c)]);
    }
}

}  // namespace

void forward(const Problem& p) { run_forward<double>(p, DType::F64); }

void forward_in_precision(const Problem& p, DType dtype) { run_forward<float>(p, dtype); }

void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads) {
    const Inputs in(p);
    ParamGrads pg;
    pg.dA_log.assign(size_t(p.HV), 0.0);
    pg.ddt_bias.assign(size_t(p.HV * in.gate_width()), 0.0);
    pg.dg_fixed.assign(size_t(p.HV), 0.0);
    for (int64_t n = 0; n < p.N(); ++n) {
        const Sequence& seq = p.seqs[size_t(n)];
        for (int64_t h = 0; h < p.H; ++h) {
            // The G value heads of a group read the same q/k head: their gradients add up.
            std::vector<double> dq(size_t(seq.len * p.K), 0.0), dk(size_t(seq.len * p.K), 0.0);
            HeadSequence<double> s;
            for (int64_t hv = h * p.G; hv < (h + 1) * p.G; ++hv) {
                s = load_head<double>(in, seq.batch, seq.start, seq.len, hv);
                backward_head(p, in, s, n, hv, d_o, d_final_state, grads, dq, dk, pg);
            }
            if (grads.dq.defined()) write_qk_grad(in, grads.dq, seq.batch, seq.start, h, dq, s.q, s.q_norm, seq.len);
            if (grads.dk.defined()) write_qk_grad(in, grads.dk, seq.batch, seq.start, h, dk, s.k, s.k_norm, seq.len);
        }
    }
    if (p.cfg.decay == Decay::Fixed && grads.dg.defined())
        for (int64_t hv = 0; hv < p.HV; ++hv)
            store_from_double(grads.dg.data, grads.dg.dtype, hv * grads.dg.stride[0], pg.dg_fixed[size_t(hv)]);
    if (grads.dA_log.defined())
        for (int64_t hv = 0; hv < p.HV; ++hv)
            store_from_double(grads.dA_log.data, grads.dA_log.dtype, hv * grads.dA_log.stride[0], pg.dA_log[size_t(hv)]);
    if (grads.ddt_bias.defined()) {
        const int64_t W = in.gate_width();
        for (int64_t hv = 0; hv < p.HV; ++hv)
            for (int64_t w = 0; w < W; ++w)
                store_from_double(grads.ddt_bias.data, grads.ddt_bias.dtype,
                                  hv * grads.ddt_bias.stride[0] + (W > 1 ? w * grads.ddt_bias.stride[1] : 0),
                                  pg.ddt_bias[size_t(hv * W + w)]);
    }
}

void decode(const DecodeProblem& p) {
    const Inputs in(p);
    const std::vector<int64_t> slots =
        p.args.state_indices.defined() ? detail::read_indices(p.args.state_indices) : std::vector<int64_t>();
    for (int64_t n = 0; n < p.N; ++n) {
        const int64_t slot = slots.empty() ? n : slots[size_t(n)];
        if (slot < 0) continue;  // a padded / finished sequence: state and o untouched
        HLA_CHECK(slot < p.slots, p.op, ": state_indices: entry ", n, " is ", slot, ", but state has only ", p.slots,
                  " slots");
        for (int64_t hv = 0; hv < p.HV; ++hv) {
            const HeadSequence<double> s = load_head<double>(in, n, 0, p.T, hv);
            std::vector<double> S = read_state<double>(p.args.state, slot, hv, p.K, p.V);
            run_tokens(in, s, p.args.o, n, 0, hv, DType::F64, S);
            write_state(p.args.state, slot, hv, p.K, p.V, S.data());
        }
    }
}

}  // namespace hla::linear::reference
