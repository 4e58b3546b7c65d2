// hla — the softmax family on the CPU: FlashAttention's tiling with an online softmax in fp32.
//
// A task is one (sequence, query head, tile of BM queries); it walks the visible keys in blocks of BN,
// keeping the running row max m, the running sum l and the unnormalised output in fp32, so memory
// stays O(BM·D) per task whatever the sequence length. Inner loops run over a contiguous dimension
// (keys of a transposed K block, or channels) so the compiler vectorizes them without -ffast-math.
//
// The backward recomputes the probabilities from the forward's log-sum-exp in two passes: one per key
// tile (dK, dV and the forget-gate column sums, no write conflicts) and one per query tile (dQ).
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "core/checks.hpp"
#include "core/cpu_math.hpp"
#include "hla/threading.hpp"
#include "ops/softmax/problem.hpp"

namespace hla::softmax::cpu {

namespace {

// 64 × 64 tiles: S, P and the K/V blocks fit in L2 (4 × 64 × 256 × 4 B = 256 KiB at D = 256) and a task
// is large enough to amortise its scheduling.
constexpr int64_t BM = 64;
constexpr int64_t BN = 64;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxD = 256;  // the head dims the CPU backend takes (dispatch checks D ≤ 256)

void load_row(const void* base, DType dtype, int64_t offset, int64_t n, float* dst) {
    switch (dtype) {
        case DType::F32: {
            const float* s = static_cast<const float*>(base) + offset;
            for (int64_t i = 0; i < n; ++i) dst[i] = s[i];
            break;
        }
        case DType::BF16: {
            const bf16* s = static_cast<const bf16*>(base) + offset;
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
            break;
        }
        default:
            for (int64_t i = 0; i < n; ++i) dst[i] = float(load_as_double(base, dtype, offset + i));
    }
}

void store_row(void* base, DType dtype, int64_t offset, int64_t n, const float* src) {
    switch (dtype) {
        case DType::F32: {
            float* d = static_cast<float*>(base) + offset;
            for (int64_t i = 0; i < n; ++i) d[i] = src[i];
            break;
        }
        case DType::BF16: {
            bf16* d = static_cast<bf16*>(base) + offset;
            for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
            break;
        }
        default:
            for (int64_t i = 0; i < n; ++i) store_from_double(base, dtype, offset + i, double(src[i]));
    }
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Where a (sequence, query head)'s rows live. Forward and decode differ only in how key j is found.
struct KeySource {
    const TensorView* k;
    const TensorView* v;
    const TensorView* g;  // per key position, query-head indexed (may be undefined)
    int64_t kvh, h;
    // Forward: keys of (batch, start + j). Decode: cache rows through `cache_row`.
    int64_t batch = 0, start = 0;
    const DecodeProblem* dp = nullptr;
    int64_t n = 0, slot = 0;
    const int64_t* slot_of = nullptr;

    // (batch-or-slot, row) of key j.
    void locate(int64_t j, int64_t& b, int64_t& row) const {
        if (!dp) {
            b = batch;
            row = start + j;
        } else if (dp->paged()) {
            const TensorView& bt = dp->args.block_table;
            b = bt.ptr<int32_t>()[n * bt.stride[0] + (j / dp->page_size) * bt.stride[1]];
            row = j % dp->page_size;
        } else {
            b = slot;
            row = j;
        }
    }
    int64_t k_off(int64_t j) const {
        int64_t b, r;
        locate(j, b, r);
        return token_offset(*k, b, r, kvh);
    }
    int64_t v_off(int64_t j) const {
        int64_t b, r;
        locate(j, b, r);
        return token_offset(*v, b, r, kvh);
    }
    double gate_log(int64_t j) const {
        int64_t b, r;
        locate(j, b, r);
        return load_as_double(g->data, g->dtype, token_offset(*g, b, r, h));
    }
};

// R_j = Σ_{s=j+1..anchor} g_s for j in [lo, anchor], so bias_ij = R_j − R_i for lo ≤ j ≤ i ≤ anchor.
// Kept in fp64 so the difference is as accurate as the bias itself however far the anchor is.
void anchored_gate_sums(const KeySource& src, int64_t lo, int64_t anchor, std::vector<double>& R) {
    R.assign(size_t(anchor - lo + 1), 0.0);
    double acc = 0;
    for (int64_t j = anchor; j >= lo; --j) {
        R[size_t(j - lo)] = acc;
        acc += src.gate_log(j);
    }
}

// Per-task scratch, allocated once per task.
struct Scratch {
    int64_t D;
    ::hla::cpu::FloatBuffer q, kt, vb, s, acc, m, l;  // line-aligned: see FloatBuffer
    std::vector<double> R;
    explicit Scratch(int64_t D_)
        : D(D_), q(size_t(BM * D)), kt(size_t(D * BN)), vb(size_t(BN * D)), s(size_t(BM * BN)), acc(size_t(BM * D)),
          m(size_t(BM)), l(size_t(BM)) {}
};

// Keys ahead of the one being copied whose K and V rows the tile loaders prefetch: a head's rows lie
// HKV·D elements apart (a new page every key in a KV cache), a stride the hardware prefetchers do not
// follow, so without it every row waits out a memory latency.
constexpr int64_t kPrefetchKeys = 8;

void prefetch_row(const TensorView& t, int64_t offset, int64_t n) {
    const int64_t esize = int64_t(dtype_size(t.dtype));
    const char* p = static_cast<const char*>(t.data) + offset * esize;
    for (int64_t at = 0; at < n * esize; at += 64) __builtin_prefetch(p + at);
}

void prefetch_key(const KeySource& src, int64_t j, int64_t D) {
    prefetch_row(*src.k, src.k_off(j), D);
    prefetch_row(*src.v, src.v_off(j), D);
}

// Loads BN keys [j0, j0 + nb) transposed (kt[d][c]) and the values row-major (vb[c][d]).
void load_kv_block(const KeySource& src, int64_t j0, int64_t nb, int64_t D, Scratch& w, float* row) {
    for (int64_t c = 0; c < std::min(nb, kPrefetchKeys); ++c) prefetch_key(src, j0 + c, D);
    for (int64_t c = 0; c < nb; ++c) {
        if (c + kPrefetchKeys < nb) prefetch_key(src, j0 + c + kPrefetchKeys, D);
        load_row(src.k->data, src.k->dtype, src.k_off(j0 + c), D, row);
        for (int64_t d = 0; d < D; ++d) w.kt[size_t(d * BN + c)] = row[size_t(d)];
        load_row(src.v->data, src.v->dtype, src.v_off(j0 + c), D, &w.vb[size_t(c * D)]);
    }
}

// Attention of `mq` query rows (already in w.q, scaled by `scale`) at positions pos0 … pos0 + mq − 1
// over `keys` keys. Leaves the normalised (ungated) output in w.acc and the log-sum-exp in lse_out.
void attend_tile(const KeySource& src, int64_t keys, int64_t pos0, int64_t mq, int64_t D, bool causal,
                 int64_t window, Scratch& w, float* lse_out) {
    int64_t lo_first, hi_first, lo_last, hi_last;
    visible_keys(causal, window, pos0, keys, lo_first, hi_first);
    visible_keys(causal, window, pos0 + mq - 1, keys, lo_last, hi_last);
    const int64_t lo = lo_first, hi = hi_last;
    std::fill(w.acc.begin(), w.acc.end(), 0.0f);
    std::fill(w.m.begin(), w.m.end(), -kInf);
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    const bool has_g = src.g && src.g->defined();
    const int64_t anchor = pos0 + mq - 1;
    if (has_g && hi > lo) anchored_gate_sums(src, lo, anchor, w.R);
    float row[kMaxD];
    for (int64_t j0 = lo; j0 < hi; j0 += BN) {
        const int64_t nb = std::min(BN, hi - j0);
        load_kv_block(src, j0, nb, D, w, row);
        // S = Q Kᵀ for the tile (register-blocked GEMM from core/cpu_math).
        ::hla::cpu::gemm(mq, nb, D, 1.0f, w.q.data(), D, 1, w.kt.data(), BN, 0.0f, w.s.data(), BN);
        for (int64_t r = 0; r < mq; ++r) {
            float* s = &w.s[size_t(r * BN)];
            const int64_t pos = pos0 + r;
            int64_t rlo, rhi;
            visible_keys(causal, window, pos, keys, rlo, rhi);
            if (has_g) {
                const double Ri = w.R[size_t(pos - lo)];
                for (int64_t c = 0; c < nb; ++c) s[c] += float(w.R[size_t(j0 + c - lo)] - Ri);
            }
            float mx = -kInf;
            for (int64_t c = 0; c < nb; ++c) {
                const int64_t j = j0 + c;
                if (j < rlo || j >= rhi) s[c] = -kInf;
                mx = std::max(mx, s[c]);
            }
            const float m_new = std::max(w.m[size_t(r)], mx);
            if (m_new == -kInf) {  // nothing visible yet: guards −inf − (−inf); P = 0 for the product
                std::fill(s, s + nb, 0.0f);
                continue;
            }
            const float alpha = ::hla::cpu::exp_scalar(w.m[size_t(r)] - m_new);
            for (int64_t c = 0; c < nb; ++c) s[c] -= m_new;
            ::hla::cpu::exp_inplace(s, nb);
            float sum = 0;
            for (int64_t c = 0; c < nb; ++c) sum += s[c];
            w.l[size_t(r)] = w.l[size_t(r)] * alpha + sum;
            w.m[size_t(r)] = m_new;
            float* acc = &w.acc[size_t(r * D)];
            for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
        }
        // O += P V.
        ::hla::cpu::gemm(mq, D, nb, 1.0f, w.s.data(), BN, 1, w.vb.data(), D, 1.0f, w.acc.data(), D);
    }
    for (int64_t r = 0; r < mq; ++r) {
        const float l = w.l[size_t(r)];
        const float inv = l > 0 ? 1.0f / l : 0.0f;  // a row that sees no key writes o = 0
        float* acc = &w.acc[size_t(r * D)];
        for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
        lse_out[r] = l > 0 ? w.m[size_t(r)] + std::log(l) : -kInf;
    }
}

// Applies the output gate to w.acc rows and stores them.
void store_output(const TensorView& o, const TensorView& gate, int64_t ob, int64_t ot0, int64_t gb, int64_t gt0,
                  int64_t h, int64_t mq, int64_t D, Scratch& w) {
    float z[kMaxD];
    for (int64_t r = 0; r < mq; ++r) {
        float* acc = &w.acc[size_t(r * D)];
        if (gate.defined()) {
            load_row(gate.data, gate.dtype, token_offset(gate, gb, gt0 + r, h), D, z);
            for (int64_t d = 0; d < D; ++d) acc[d] *= sigmoidf(z[d]);
        }
        store_row(o.data, o.dtype, token_offset(o, ob, ot0 + r, h), D, acc);
    }
}

float* lse_ptr(const TensorView& lse, int64_t b, int64_t h, int64_t t) {
    return lse.ptr<float>() + b * lse.stride[0] + h * lse.stride[1] + t * lse.stride[2];
}

// Tasks of a forward problem: (sequence, head, query tile).
struct TileTask {
    int64_t seq, h, t0;
};

std::vector<TileTask> query_tiles(const Problem& p, int64_t tile) {
    std::vector<TileTask> tasks;
    for (int64_t s = 0; s < p.N(); ++s)
        for (int64_t h = 0; h < p.HQ; ++h)
            for (int64_t t0 = 0; t0 < p.seqs[size_t(s)].len; t0 += tile) tasks.push_back({s, h, t0});
    // Longest tasks first (late causal tiles see the most keys) so the dynamic schedule balances.
    std::stable_sort(tasks.begin(), tasks.end(), [](const TileTask& a, const TileTask& b) { return a.t0 > b.t0; });
    return tasks;
}

}  // namespace

void forward(const Problem& p) {
    const SoftmaxForwardArgs& a = p.args;
    const std::vector<TileTask> tasks = query_tiles(p, BM);
    parallel_for(int64_t(tasks.size()), [&](int64_t i) {
        const TileTask& tk = tasks[size_t(i)];
        const Sequence& sq = p.seqs[size_t(tk.seq)];
        const int64_t mq = std::min(BM, sq.len - tk.t0);
        Scratch w(p.D);
        KeySource src{&a.k, &a.v, &a.g, tk.h / p.G, tk.h};
        src.batch = sq.batch;
        src.start = sq.start;
        for (int64_t r = 0; r < mq; ++r) {
            float* q = &w.q[size_t(r * p.D)];
            load_row(a.q.data, a.q.dtype, token_offset(a.q, sq.batch, sq.start + tk.t0 + r, tk.h), p.D, q);
            for (int64_t d = 0; d < p.D; ++d) q[d] *= float(p.scale);
        }
        float lse[BM];
        attend_tile(src, sq.len, tk.t0, mq, p.D, p.cfg.causal, p.window, w, lse);
        store_output(a.o, a.gate, sq.batch, sq.start + tk.t0, sq.batch, sq.start + tk.t0, tk.h, mq, p.D, w);
        if (a.lse.defined())
            for (int64_t r = 0; r < mq; ++r) *lse_ptr(a.lse, sq.batch, tk.h, sq.start + tk.t0 + r) = lse[r];
    });
}

namespace {

// Scratch of the decode jobs, kept between calls. prepare() runs on the calling thread before the jobs
// and tops the pool up to one scratch per job, so only a call that needs more (or larger) scratch
// than any before it allocates, whichever pool threads run the jobs. Concurrent calls share the pool
// under its lock; a job that finds it empty (more concurrent jobs than ever prepared) makes its own.
class DecodeScratchPool {
public:
    void prepare(int jobs, int64_t D, int64_t gate_keys) {
        const std::lock_guard<std::mutex> lock(mutex_);
        if (D != D_) {
            free_.clear();
            D_ = D;
        }
        if (free_.capacity() < size_t(2 * jobs)) free_.reserve(size_t(2 * jobs));
        while (free_.size() < size_t(jobs)) free_.push_back(std::make_unique<Scratch>(D));
        for (auto& s : free_) s->R.reserve(size_t(gate_keys));
    }
    std::unique_ptr<Scratch> take(int64_t D, int64_t gate_keys) {
        {
            const std::lock_guard<std::mutex> lock(mutex_);
            if (!free_.empty() && free_.back()->D == D) {
                std::unique_ptr<Scratch> s = std::move(free_.back());
                free_.pop_back();
                return s;
            }
        }
        auto s = std::make_unique<Scratch>(D);
        s->R.reserve(size_t(gate_keys));
        return s;
    }
    void give(std::unique_ptr<Scratch> s) {
        const std::lock_guard<std::mutex> lock(mutex_);
        if (s->D == D_) free_.push_back(std::move(s));
    }

private:
    std::mutex mutex_;
    int64_t D_ = 0;
    std::vector<std::unique_ptr<Scratch>> free_;
};

DecodeScratchPool& decode_scratch() {
    static DecodeScratchPool pool;
    return pool;
}

}  // namespace

// The decode step runs once per generated token: after the first call of a shape it touches the heap
// no more (tests/test_decode_no_alloc.cpp). Lengths and slots are read where they lie, the tasks are
// numbered instead of listed, and the scratch comes from DecodeScratchPool.
void decode(const DecodeProblem& p) {
    const SoftmaxKVCacheArgs& a = p.args;
    const auto length = [&](int64_t n) {
        return a.cache_seqlens.defined() ? detail::read_host_index(a.cache_seqlens, n) : p.capacity;
    };
    auto source = [&](int64_t n, int64_t h, const TensorView* k, const TensorView* v) {
        KeySource src{k, v, &a.g_cache, h / p.G, h};
        src.dp = &p;
        src.n = n;
        src.slot = a.cache_batch_idx.defined() ? detail::read_host_index(a.cache_batch_idx, n) : n;
        return src;
    };
    // 1. Append the new tokens (and their gates) to the cache.
    if (p.append) {
        float row[kMaxD];
        for (int64_t n = 0; n < p.N; ++n)
            for (int64_t t = 0; t < p.TQ; ++t) {
                const int64_t j = length(n) + t;
                for (int64_t kvh = 0; kvh < p.HKV; ++kvh) {
                    const KeySource s = source(n, kvh * p.G, &a.k_cache, &a.v_cache);
                    load_row(a.k.data, a.k.dtype, token_offset(a.k, n, t, kvh), p.D, row);
                    store_row(a.k_cache.data, a.k_cache.dtype, s.k_off(j), p.D, row);
                    load_row(a.v.data, a.v.dtype, token_offset(a.v, n, t, kvh), p.D, row);
                    store_row(a.v_cache.data, a.v_cache.dtype, s.v_off(j), p.D, row);
                }
                if (a.g_cache.defined()) {
                    int64_t b, r;
                    source(n, 0, &a.k_cache, &a.v_cache).locate(j, b, r);
                    for (int64_t h = 0; h < p.HQ; ++h)
                        a.g_cache.ptr<float>()[token_offset(a.g_cache, b, r, h)] =
                            float(load_as_double(a.g.data, a.g.dtype, token_offset(a.g, n, t, h)));
                }
            }
    }
    // 2. Attend: tasks (sequence, head, query tile), numbered n-major and dealt round-robin to one job
    // per worker, so each job takes one scratch from the pool for all its tasks.
    const int64_t tiles = (p.TQ + BM - 1) / BM, tasks = p.N * p.HQ * tiles;
    const int64_t jobs = std::min<int64_t>(tasks, num_threads());
    const int64_t gate_keys = a.g_cache.defined() ? p.capacity + 1 : 0;
    decode_scratch().prepare(int(jobs), p.D, gate_keys);
    parallel_for(jobs, [&](int64_t job) {
        std::unique_ptr<Scratch> scratch = decode_scratch().take(p.D, gate_keys);
        Scratch& w = *scratch;
        for (int64_t i = job; i < tasks; i += jobs) {
            const int64_t n = i / (p.HQ * tiles), h = i / tiles % p.HQ, t0 = i % tiles * BM;
            const int64_t Lk = length(n) + (p.append ? p.TQ : 0);
            const int64_t mq = std::min(BM, p.TQ - t0);
            const KeySource src = source(n, h, &a.k_cache, &a.v_cache);
            for (int64_t r = 0; r < mq; ++r) {
                float* q = &w.q[size_t(r * p.D)];
                load_row(a.q.data, a.q.dtype, token_offset(a.q, n, t0 + r, h), p.D, q);
                for (int64_t d = 0; d < p.D; ++d) q[d] *= float(p.scale);
            }
            float lse[BM];
            attend_tile(src, Lk, Lk - p.TQ + t0, mq, p.D, p.cfg.causal, p.window, w, lse);
            store_output(a.o, a.gate, n, t0, n, t0, h, mq, p.D, w);
            if (a.lse.defined())
                for (int64_t r = 0; r < mq; ++r) *lse_ptr(a.lse, n, h, t0 + r) = lse[r];
        }
        decode_scratch().give(std::move(scratch));
    });
}

// ---- backward -------------------------------------------------------------------------------------

namespace {

// Per-row quantities of the backward, precomputed once: dA = dO ⊙ σ(z) (the gradient of the ungated
// output, fp32, [B, T, HQ, D] compact), delta = Σ_d dO ⊙ o (= Σ_d dA ⊙ a), and the lse.
struct RowTerms {
    int64_t T, HQ, D;
    std::vector<float> dA, delta;
    float* dA_row(int64_t b, int64_t t, int64_t h) { return &dA[size_t(((b * T + t) * HQ + h) * D)]; }
    float& delta_at(int64_t b, int64_t t, int64_t h) { return delta[size_t((b * T + t) * HQ + h)]; }
};

// Recomputes one (query tile × key block) of the probabilities P = exp(S − lse) and
// dS = P ⊙ (dP − delta), with dP = dA Vᵀ. Rows are queries [t0, t0 + mq), columns keys [j0, j0 + nb).
struct BwdTile {
    ::hla::cpu::FloatBuffer q, dA, kt, vt, kb, p, ds, lse, delta;
    explicit BwdTile(int64_t D)
        : q(size_t(BM * D)), dA(size_t(BM * D)), kt(size_t(D * BN)), vt(size_t(D * BN)), kb(size_t(BN * D)),
          p(size_t(BM * BN)), ds(size_t(BM * BN)), lse(size_t(BM)), delta(size_t(BM)) {}
};

void load_query_side(const Problem& p, RowTerms& rt, const Sequence& sq, int64_t h, int64_t t0, int64_t mq,
                     BwdTile& w) {
    const SoftmaxForwardArgs& a = p.args;
    for (int64_t r = 0; r < mq; ++r) {
        const int64_t tok = sq.start + t0 + r;
        load_row(a.q.data, a.q.dtype, token_offset(a.q, sq.batch, tok, h), p.D, &w.q[size_t(r * p.D)]);
        std::copy_n(rt.dA_row(sq.batch, tok, h), p.D, &w.dA[size_t(r * p.D)]);
        w.lse[size_t(r)] = *lse_ptr(a.lse, sq.batch, h, tok);
        w.delta[size_t(r)] = rt.delta_at(sq.batch, tok, h);
    }
}

void load_key_side(const Problem& p, const Sequence& sq, int64_t kvh, int64_t j0, int64_t nb, BwdTile& w) {
    const SoftmaxForwardArgs& a = p.args;
    std::vector<float> row(size_t(p.D));
    const auto prefetch = [&](int64_t c) {
        const int64_t tok = sq.start + j0 + c;
        prefetch_row(a.k, token_offset(a.k, sq.batch, tok, kvh), p.D);
        prefetch_row(a.v, token_offset(a.v, sq.batch, tok, kvh), p.D);
    };
    for (int64_t c = 0; c < std::min(nb, kPrefetchKeys); ++c) prefetch(c);
    for (int64_t c = 0; c < nb; ++c) {
        if (c + kPrefetchKeys < nb) prefetch(c + kPrefetchKeys);
        const int64_t tok = sq.start + j0 + c;
        load_row(a.k.data, a.k.dtype, token_offset(a.k, sq.batch, tok, kvh), p.D, &w.kb[size_t(c * p.D)]);
        for (int64_t d = 0; d < p.D; ++d) w.kt[size_t(d * BN + c)] = w.kb[size_t(c * p.D + d)];
        load_row(a.v.data, a.v.dtype, token_offset(a.v, sq.batch, tok, kvh), p.D, row.data());
        for (int64_t d = 0; d < p.D; ++d) w.vt[size_t(d * BN + c)] = row[size_t(d)];
    }
}

// Fills w.p and w.ds for the tile. R (anchored gate sums over [Rlo, …]) gives the bias when g is set.
void probabilities_and_ds(const Problem& p, int64_t t0, int64_t mq, int64_t j0, int64_t nb, const double* R,
                          int64_t Rlo, BwdTile& w) {
    // Scores (scaled) and dP = dA Vᵀ for the tile.
    ::hla::cpu::gemm(mq, nb, p.D, float(p.scale), w.q.data(), p.D, 1, w.kt.data(), BN, 0.0f, w.p.data(), BN);
    ::hla::cpu::gemm(mq, nb, p.D, 1.0f, w.dA.data(), p.D, 1, w.vt.data(), BN, 0.0f, w.ds.data(), BN);
    for (int64_t r = 0; r < mq; ++r) {
        float* pr = &w.p[size_t(r * BN)];
        float* dp = &w.ds[size_t(r * BN)];
        const int64_t pos = t0 + r;
        int64_t rlo, rhi;
        visible_keys(p.cfg.causal, p.window, pos, INT64_MAX, rlo, rhi);
        const float lse = w.lse[size_t(r)];
        const float delta = w.delta[size_t(r)];
        const double Ri = R ? R[pos - Rlo] : 0.0;
        for (int64_t c = 0; c < nb; ++c) {
            const int64_t j = j0 + c;
            if (j >= rlo && j < rhi && lse != -kInf) {
                const float bias = R ? float(R[j - Rlo] - Ri) : 0.0f;
                pr[c] = pr[c] + bias - lse;
            } else {
                pr[c] = -kInf;  // exp → 0
            }
        }
        ::hla::cpu::exp_inplace(pr, nb);
        for (int64_t c = 0; c < nb; ++c) dp[c] = pr[c] * (dp[c] - delta);
    }
}

}  // namespace

void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g) {
    const SoftmaxForwardArgs& a = p.args;
    const int64_t D = p.D;
    RowTerms rt{p.T, p.HQ, D, std::vector<float>(size_t(p.B * p.T * p.HQ * D), 0.0f),
                std::vector<float>(size_t(p.B * p.T * p.HQ), 0.0f)};
    // Row terms and the output-gate gradient dz = dO ⊙ o ⊙ (1 − σ(z)) (o is the gated output).
    parallel_for(p.B * p.T, [&](int64_t bt) {
        const int64_t b = bt / p.T, t = bt % p.T;
        std::vector<float> o(static_cast<size_t>(D)), z(static_cast<size_t>(D)), dz(static_cast<size_t>(D));
        for (int64_t h = 0; h < p.HQ; ++h) {
            float* da = rt.dA_row(b, t, h);
            load_row(d_o.data, d_o.dtype, token_offset(d_o, b, t, h), D, da);
            load_row(a.o.data, a.o.dtype, token_offset(a.o, b, t, h), D, o.data());
            float delta = 0;
            for (int64_t d = 0; d < D; ++d) delta += da[d] * o[size_t(d)];
            rt.delta_at(b, t, h) = delta;
            if (a.gate.defined()) {
                load_row(a.gate.data, a.gate.dtype, token_offset(a.gate, b, t, h), D, z.data());
                for (int64_t d = 0; d < D; ++d) {
                    const float sg = sigmoidf(z[size_t(d)]);
                    dz[size_t(d)] = da[d] * o[size_t(d)] * (1 - sg);
                    da[d] *= sg;
                }
                if (g.dgate.defined()) store_row(g.dgate.data, g.dgate.dtype, token_offset(g.dgate, b, t, h), D, dz.data());
            }
        }
    });

    // Pass 1, per (sequence, kv head, key tile): dK, dV and, per query head, the column sums of dS.
    // With C_t = Σ_{s≤t} g_s, bias_ij = C_i − C_j, so dC_t = Σ_j dS_tj − Σ_i dS_it and dg_s = Σ_{t≥s} dC_t.
    // The row sums vanish in exact arithmetic but are kept: they cancel the rounding of delta (computed
    // from the stored o), which would otherwise accumulate along the suffix sum.
    std::vector<float> colsum(g.dg.defined() ? size_t(p.B * p.T * p.HQ) : 0, 0.0f);
    std::vector<float> rowsum(colsum.size(), 0.0f);
    if (g.dk.defined() || g.dv.defined() || g.dg.defined()) {
        std::vector<TileTask> tasks;
        for (int64_t s = 0; s < p.N(); ++s)
            for (int64_t kvh = 0; kvh < p.HKV; ++kvh)
                for (int64_t j0 = 0; j0 < p.seqs[size_t(s)].len; j0 += BN) tasks.push_back({s, kvh, j0});
        parallel_for(int64_t(tasks.size()), [&](int64_t ti) {
            const TileTask& tk = tasks[size_t(ti)];
            const Sequence& sq = p.seqs[size_t(tk.seq)];
            const int64_t kvh = tk.h, j0 = tk.t0, nb = std::min(BN, sq.len - j0);
            BwdTile w(D);
            load_key_side(p, sq, kvh, j0, nb, w);
            ::hla::cpu::FloatBuffer dk(size_t(BN * D), 0.0f), dv(size_t(BN * D), 0.0f);
            // Queries that can see a key of this tile: [j0, j0 + nb − 1 + window − 1] (causal), or all.
            const int64_t q_lo = p.cfg.causal ? j0 : 0;
            const int64_t q_hi = p.window > 0 ? std::min(sq.len, j0 + nb - 1 + p.window) : sq.len;
            for (int64_t h = kvh * p.G; h < (kvh + 1) * p.G; ++h) {
                std::vector<double> R;
                KeySource src{&a.k, &a.v, &a.g, kvh, h};
                src.batch = sq.batch;
                src.start = sq.start;
                const int64_t r_lo = std::min(q_lo, j0);
                if (a.g.defined() && q_hi > q_lo) anchored_gate_sums(src, r_lo, q_hi - 1, R);
                std::vector<float> cs(size_t(BN), 0.0f);
                for (int64_t t0 = q_lo; t0 < q_hi; t0 += BM) {
                    const int64_t mq = std::min(BM, q_hi - t0);
                    load_query_side(p, rt, sq, h, t0, mq, w);
                    probabilities_and_ds(p, t0, mq, j0, nb, a.g.defined() ? R.data() : nullptr, r_lo, w);
                    // dV += Pᵀ dA, dK += scale · dSᵀ Q (Aᵀ by strides), and the column sums of dS.
                    ::hla::cpu::gemm(nb, D, mq, 1.0f, w.p.data(), 1, BN, w.dA.data(), D, 1.0f, dv.data(), D);
                    ::hla::cpu::gemm(nb, D, mq, float(p.scale), w.ds.data(), 1, BN, w.q.data(), D, 1.0f, dk.data(), D);
                    if (g.dg.defined())
                        for (int64_t r = 0; r < mq; ++r)
                            for (int64_t c = 0; c < nb; ++c) cs[size_t(c)] += w.ds[size_t(r * BN + c)];
                }
                if (g.dg.defined())
                    for (int64_t c = 0; c < nb; ++c)
                        colsum[size_t((sq.batch * p.T + sq.start + j0 + c) * p.HQ + h)] = cs[size_t(c)];
            }
            for (int64_t c = 0; c < nb; ++c) {
                const int64_t tok = sq.start + j0 + c;
                if (g.dk.defined()) store_row(g.dk.data, g.dk.dtype, token_offset(g.dk, sq.batch, tok, kvh), D, &dk[size_t(c * D)]);
                if (g.dv.defined()) store_row(g.dv.data, g.dv.dtype, token_offset(g.dv, sq.batch, tok, kvh), D, &dv[size_t(c * D)]);
            }
        });
    }

    // Pass 2, per (sequence, query head, query tile): dQ = scale · dS K, and the row sums of dS.
    if (g.dq.defined() || g.dg.defined()) {
        const std::vector<TileTask> tasks = query_tiles(p, BM);
        parallel_for(int64_t(tasks.size()), [&](int64_t ti) {
            const TileTask& tk = tasks[size_t(ti)];
            const Sequence& sq = p.seqs[size_t(tk.seq)];
            const int64_t h = tk.h, kvh = h / p.G, t0 = tk.t0, mq = std::min(BM, sq.len - t0);
            BwdTile w(D);
            load_query_side(p, rt, sq, h, t0, mq, w);
            int64_t lo, hi_first, lo_last, hi;
            visible_keys(p.cfg.causal, p.window, t0, sq.len, lo, hi_first);
            visible_keys(p.cfg.causal, p.window, t0 + mq - 1, sq.len, lo_last, hi);
            std::vector<double> R;
            KeySource src{&a.k, &a.v, &a.g, kvh, h};
            src.batch = sq.batch;
            src.start = sq.start;
            if (a.g.defined() && hi > lo) anchored_gate_sums(src, lo, t0 + mq - 1, R);
            ::hla::cpu::FloatBuffer dq(size_t(BM * D), 0.0f);
            std::vector<double> rs(size_t(BM), 0.0);
            for (int64_t j0 = lo; j0 < hi; j0 += BN) {
                const int64_t nb = std::min(BN, hi - j0);
                load_key_side(p, sq, kvh, j0, nb, w);
                probabilities_and_ds(p, t0, mq, j0, nb, a.g.defined() ? R.data() : nullptr, lo, w);
                ::hla::cpu::gemm(mq, D, nb, float(p.scale), w.ds.data(), BN, 1, w.kb.data(), D, 1.0f, dq.data(), D);
                for (int64_t r = 0; r < mq; ++r)
                    for (int64_t c = 0; c < nb; ++c) rs[size_t(r)] += w.ds[size_t(r * BN + c)];
            }
            for (int64_t r = 0; r < mq; ++r) {
                const int64_t tok = sq.start + t0 + r;
                if (g.dq.defined()) store_row(g.dq.data, g.dq.dtype, token_offset(g.dq, sq.batch, tok, h), D, &dq[size_t(r * D)]);
                if (g.dg.defined()) rowsum[size_t((sq.batch * p.T + tok) * p.HQ + h)] = float(rs[size_t(r)]);
            }
        });
    }

    // dg_s = Σ_{t ≥ s} (rowsum_t − colsum_t) within each sequence.
    if (g.dg.defined()) {
        parallel_for(p.N() * p.HQ, [&](int64_t i) {
            const Sequence& sq = p.seqs[size_t(i / p.HQ)];
            const int64_t h = i % p.HQ;
            double acc = 0;
            for (int64_t t = sq.len - 1; t >= 0; --t) {
                const int64_t tok = sq.start + t;
                const size_t at = size_t((sq.batch * p.T + tok) * p.HQ + h);
                acc += double(rowsum[at]) - double(colsum[at]);
                g.dg.ptr<float>()[token_offset(g.dg, sq.batch, tok, h)] = float(acc);
            }
        });
    }
}

}  // namespace hla::softmax::cpu
