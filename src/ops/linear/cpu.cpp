// hla — the linear family's CPU backend: chunked forward and backward over (sequence, head) tasks,
// and the decode step. The per-chunk math lives in cpu_chunk.cpp; this file moves data: it loads
// chunks through the per-token transforms, carries the state across chunks and writes results.
//
// Parallelism: forward runs one task per (sequence, group of consecutive value heads), decode one per
// (sequence, value head); backward runs one task per (sequence, query/key head) because the G value
// heads of a group all add into the same dq/dk.
// Chunks: the forward runs forward_chunk() = 16 tokens at a time (32 for GLA), the backward kChunk = 64
// (cpu_chunk.hpp).
// Backward memory: the state at the start of every chunk of the task's sequence, T/64 · K · V fp32
// per task in flight (4 MiB for T = 4096, K = V = 128), recomputed by a forward sweep.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "hla/threading.hpp"
#include "ops/linear/cpu_chunk.hpp"
#include "ops/linear/cpu_io.hpp"

namespace hla::linear::cpu {

namespace {

// One chunk's transformed inputs, owned (ChunkView points into it).
struct ChunkBuffers {
    ChunkBuffers(int64_t K, int64_t V)
        : q(kChunk * K), k(kChunk * K), v(kChunk * V), g(kChunk * K), b(kChunk), beta(kChunk), gate_in(kChunk * K) {}
    hla::cpu::FloatBuffer q, k, v, g, b, beta, gate_in;
};

// What load_chunk prefetches for the load after it: the rows of head hv at `shift` tokens from the ones
// it loads (hv < 0: nothing).
struct NextLoad {
    int64_t hv = -1;
    int64_t shift = 0;
};

// Loads tokens [t0, t0 + L) of sequence `s`, value head hv, and forms the cumulative log decay (one
// decay per token; vector decay works from running products of the per-token decays instead). Each
// head's row of a token is too short for the hardware prefetcher, so without help every row costs a
// memory latency: token by token, the rows of `next` (q, k, v and vector g) are prefetched. With
// shift 0 they share a page with the rows just read; otherwise the prefetch starts with a load.
ChunkView load_chunk(const InputViews& in, const Sequence& s, int64_t hv, int64_t t0, int L, ChunkBuffers& cb,
                     NextLoad next = {}) {
    const bool vec = in.vector_decay();
    const int64_t K = in.K, V = in.V, width = vec ? K : 1;
    const bool next_qk = next.hv >= 0 && (next.shift != 0 || next.hv / in.G != hv / in.G);
    const bool touch = next.shift != 0;
    for (int i = 0; i < L; ++i) {
        const int64_t t = s.start + t0 + i;
        load_token(in, s.batch, t, hv, cb.q.data() + i * K, cb.k.data() + i * K, cb.v.data() + i * V,
                   cb.g.data() + i * width, cb.beta.data() + i, cb.gate_in.data() + i * width);
        const int64_t tn = t + next.shift;
        if (next.hv >= 0 && tn >= s.start && tn < s.start + s.len) {
            if (next_qk) {
                prefetch_row(in.q, token_offset(in.q, s.batch, tn, next.hv / in.G), K, touch);
                prefetch_row(in.k, token_offset(in.k, s.batch, tn, next.hv / in.G), K, touch);
            }
            prefetch_row(in.v, token_offset(in.v, s.batch, tn, next.hv), V, touch);
            if (vec) prefetch_row(in.g, token_offset(in.g, s.batch, tn, next.hv), K, touch);
        }
        if (!vec) cb.b[i] = cb.g[i] + (i > 0 ? cb.b[i - 1] : 0.0f);
    }
    ChunkView c;
    c.L = L;
    c.K = K;
    c.V = V;
    c.q = cb.q.data();
    c.k = cb.k.data();
    c.v = cb.v.data();
    c.g = cb.g.data();
    c.b = cb.b.data();
    c.beta = cb.beta.data();
    c.decay = in.cfg.decay != Decay::None;
    return c;
}

using ForwardFn = void (*)(const ChunkView&, float*, float*, Workspace&);
using BackwardFn = void (*)(const ChunkView&, const float*, const float*, float*, float*, float*, float*, float*,
                            float*, Workspace&);

ForwardFn pick_forward(const LinearConfig& c) {
    const bool vec = c.decay == Decay::Vector, delta = c.update == Update::Delta;
    if (vec) return delta ? chunk_forward<true, true> : chunk_forward<true, false>;
    return delta ? chunk_forward<false, true> : chunk_forward<false, false>;
}

BackwardFn pick_backward(const LinearConfig& c) {
    const bool vec = c.decay == Decay::Vector, delta = c.update == Update::Delta;
    if (vec) return delta ? chunk_backward<true, true> : chunk_backward<true, false>;
    return delta ? chunk_backward<false, true> : chunk_backward<false, false>;
}

// States are [N, HV, K, V] f32 with a contiguous V dimension; the other strides are free (a state may be
// a slice of a larger cache).
void load_state(const TensorView& st, int64_t n, int64_t hv, int64_t K, int64_t V, float* S) {
    if (!st.defined()) {
        std::fill(S, S + K * V, 0.0f);
        return;
    }
    const float* base = st.ptr<float>() + n * st.stride[0] + hv * st.stride[1];
    for (int64_t r = 0; r < K; ++r) std::memcpy(S + r * V, base + r * st.stride[2], size_t(V) * sizeof(float));
}

void store_state(const TensorView& st, int64_t n, int64_t hv, int64_t K, int64_t V, const float* S) {
    if (!st.defined()) return;
    float* base = st.ptr<float>() + n * st.stride[0] + hv * st.stride[1];
    for (int64_t r = 0; r < K; ++r) std::memcpy(base + r * st.stride[2], S + r * V, size_t(V) * sizeof(float));
}

int64_t num_chunks(int64_t len) { return (len + kChunk - 1) / kChunk; }

}  // namespace

// Consecutive value heads handled by one forward task. A head's rows are H·K floats apart, so one head
// alone touches a new page on every token; a few neighbouring heads share those pages. Small enough to
// leave every thread several tasks, at most 8 (8 states of K·V fp32 stay in L2 at K = V = 128).
int64_t heads_per_task(int64_t N, int64_t HV) {
    const int64_t per = N * HV / (2 * int64_t(num_threads()));
    return std::clamp<int64_t>(per, 1, 8);
}

void forward(const Problem& p) {
    const InputViews in = input_views(p);
    const ForwardFn fwd = pick_forward(p.cfg);
    const int64_t K = p.K, V = p.V, HV = p.HV, KV = K * V;
    const int64_t group = heads_per_task(p.N(), HV), groups = (HV + group - 1) / group;
    const int64_t chunk = forward_chunk(p.cfg.decay == Decay::Vector, p.cfg.update == Update::Delta);
    const TensorView& o = p.args.o;
    parallel_for(p.N() * groups, [&](int64_t task) {
        const hla::cpu::FlushSubnormals flush;
        const int64_t n = task / groups, hv0 = task % groups * group, hv1 = std::min(HV, hv0 + group);
        const Sequence& s = p.seqs[size_t(n)];
        thread_local std::unique_ptr<Workspace> ws;
        thread_local std::unique_ptr<ChunkBuffers> cb;
        thread_local hla::cpu::FloatBuffer states, out;
        if (!ws || ws->K != K || ws->V != V) {
            ws = std::make_unique<Workspace>(K, V);
            cb = std::make_unique<ChunkBuffers>(K, V);
            out.assign(kChunk * V, 0.0f);
        }
        states.resize(size_t(group * KV));
        for (int64_t hv = hv0; hv < hv1; ++hv) load_state(p.args.initial_state, n, hv, K, V, states.data() + (hv - hv0) * KV);
        for (int64_t t0 = 0; t0 < s.len; t0 += chunk) {
            const int L = int(std::min<int64_t>(chunk, s.len - t0));
            for (int64_t hv = hv0; hv < hv1; ++hv) {
                const NextLoad next = hv + 1 < hv1 ? NextLoad{hv + 1, 0} : NextLoad{hv0, chunk};
                const ChunkView c = load_chunk(in, s, hv, t0, L, *cb, next);
                fwd(c, states.data() + (hv - hv0) * KV, out.data(), *ws);
                for (int i = 0; i < L; ++i)
                    write_row_streaming(o, token_offset(o, s.batch, s.start + t0 + i, hv), out.data() + i * V, V);
            }
        }
        for (int64_t hv = hv0; hv < hv1; ++hv) store_state(p.args.final_state, n, hv, K, V, states.data() + (hv - hv0) * KV);
        streaming_fence();
    });
}

void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads) {
    const InputViews in = input_views(p);
    const LinearConfig& cfg = p.cfg;
    const ForwardFn fwd = pick_forward(cfg);
    const BackwardFn bwd = pick_backward(cfg);
    const int64_t K = p.K, V = p.V, H = p.H, HV = p.HV, G = p.G, KV = K * V, N = p.N();
    const bool vec = cfg.decay == Decay::Vector;
    const int64_t width = vec ? K : 1;
    const bool gate_act = cfg.gate_activation != GateActivation::None;
    // Per-sequence partial sums of the per-head parameters' gradients, reduced after the tasks:
    // Fixed decay γ [HV]; A_log [HV]; dt_bias [HV, width].
    std::vector<double> part_gamma(size_t(N * HV), 0.0), part_alog(size_t(N * HV), 0.0),
        part_dt(size_t(N * HV * width), 0.0);

    parallel_for(N * H, [&](int64_t task) {
        const hla::cpu::FlushSubnormals flush;
        const int64_t n = task / H, h = task % H;
        const Sequence& s = p.seqs[size_t(n)];
        const int64_t len = s.len;
        Workspace w(K, V);
        ChunkBuffers cb(K, V);
        hla::cpu::FloatBuffer states(size_t(std::max<int64_t>(num_chunks(len), 1) * KV)), S(KV), dS(KV);
        hla::cpu::FloatBuffer dq_acc(size_t(len * K), 0.0f), dk_acc(size_t(len * K), 0.0f);
        hla::cpu::FloatBuffer dO(kChunk * V), dv(kChunk * V), db(kChunk * K), dbeta(kChunk);
        for (int64_t hv = h * G; hv < (h + 1) * G; ++hv) {
            // Forward sweep: keep the state at the start of every chunk.
            load_state(p.args.initial_state, n, hv, K, V, S.data());
            for (int64_t ci = 0; ci < num_chunks(len); ++ci) {
                std::copy(S.begin(), S.end(), states.begin() + ci * KV);
                const int64_t t0 = ci * kChunk;
                const int L = int(std::min<int64_t>(kChunk, len - t0));
                fwd(load_chunk(in, s, hv, t0, L, cb), S.data(), nullptr, w);
            }
            // Backward sweep, last chunk first, carrying dS.
            load_state(d_final_state, n, hv, K, V, dS.data());
            for (int64_t ci = num_chunks(len) - 1; ci >= 0; --ci) {
                const int64_t t0 = ci * kChunk;
                const int L = int(std::min<int64_t>(kChunk, len - t0));
                const ChunkView c = load_chunk(in, s, hv, t0, L, cb);
                for (int i = 0; i < L; ++i)
                    read_row(d_o, token_offset(d_o, s.batch, s.start + t0 + i, hv), V, dO.data() + i * V);
                bwd(c, states.data() + ci * KV, dO.data(), dS.data(), dq_acc.data() + t0 * K, dk_acc.data() + t0 * K,
                    dv.data(), db.data(), dbeta.data(), w);
                for (int i = 0; i < L; ++i) {
                    const int64_t t = s.start + t0 + i;
                    if (grads.dv.defined()) write_row(grads.dv, token_offset(grads.dv, s.batch, t, hv), dv.data() + i * V, V);
                    if (p.delta() && grads.dbeta.defined()) {
                        const float raw = read_scalar(in.beta, token_offset(in.beta, s.batch, t, hv));
                        grads.dbeta.ptr<float>()[token_offset(grads.dbeta, s.batch, t, hv)] =
                            dbeta[i] * beta_derivative<float>(cfg, raw);
                    }
                    float* dgi = db.data() + i * width;
                    if (cfg.decay == Decay::Fixed) {
                        part_gamma[size_t(n * HV + hv)] += dgi[0];
                    } else if (cfg.decay == Decay::Scalar || cfg.decay == Decay::Vector) {
                        if (gate_act) {
                            const float a_log = read_scalar(in.A_log, hv * in.A_log.stride[0]);
                            for (int64_t ch = 0; ch < width; ++ch) {
                                float d_dx = 1, d_dalog = 0;
                                gate_derivatives<float>(cfg, cb.gate_in[i * width + ch], a_log, &d_dx, &d_dalog);
                                part_alog[size_t(n * HV + hv)] += double(dgi[ch]) * d_dalog;
                                dgi[ch] *= d_dx;
                                part_dt[size_t((n * HV + hv) * width + ch)] += dgi[ch];
                            }
                        }
                        if (grads.dg.defined())
                            std::memcpy(grads.dg.ptr<float>() + token_offset(grads.dg, s.batch, t, hv), dgi,
                                        size_t(width) * sizeof(float));
                    }
                }
            }
            store_state(grads.dinitial_state, n, hv, K, V, dS.data());
        }
        // dq, dk: through the scale and the in-kernel L2 norm, then out.
        std::vector<float> x(K);
        for (int64_t i = 0; i < len; ++i) {
            const int64_t t = s.start + i;
            float* dqi = dq_acc.data() + i * K;
            float* dki = dk_acc.data() + i * K;
            for (int64_t c = 0; c < K; ++c) dqi[c] *= in.scale;
            if (cfg.qk_l2norm) {
                for (auto [src, d] : {std::pair{&in.q, dqi}, std::pair{&in.k, dki}}) {
                    read_row(*src, token_offset(*src, s.batch, t, h), K, x.data());
                    const float norm = l2norm_denominator(x.data(), K);
                    for (int64_t c = 0; c < K; ++c) x[c] /= norm;
                    l2norm_backward(x.data(), norm, d, K);
                }
            }
            if (grads.dq.defined()) write_row(grads.dq, token_offset(grads.dq, s.batch, t, h), dqi, K);
            if (grads.dk.defined()) write_row(grads.dk, token_offset(grads.dk, s.batch, t, h), dki, K);
        }
    });

    // Per-head parameters: sum the per-sequence partials.
    for (int64_t hv = 0; hv < HV; ++hv) {
        double gsum = 0, asum = 0;
        for (int64_t n = 0; n < N; ++n) {
            gsum += part_gamma[size_t(n * HV + hv)];
            asum += part_alog[size_t(n * HV + hv)];
        }
        if (cfg.decay == Decay::Fixed && grads.dg.defined()) grads.dg.ptr<float>()[hv * grads.dg.stride[0]] = float(gsum);
        if (grads.dA_log.defined()) grads.dA_log.ptr<float>()[hv * grads.dA_log.stride[0]] = float(asum);
        if (grads.ddt_bias.defined())
            for (int64_t ch = 0; ch < width; ++ch) {
                double dsum = 0;
                for (int64_t n = 0; n < N; ++n) dsum += part_dt[size_t((n * HV + hv) * width + ch)];
                grads.ddt_bias.ptr<float>()[hv * grads.ddt_bias.stride[0] + ch] = float(dsum);
            }
    }
}

}  // namespace hla::linear::cpu
