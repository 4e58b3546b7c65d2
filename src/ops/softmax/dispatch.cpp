// hla — the softmax family's front door: checks every argument once, builds the Problem, picks the
// backend. Backends never re-check.
#include <algorithm>
#include <cmath>

#include "core/checks.hpp"
#include "ops/softmax/problem.hpp"

namespace hla {

using detail::check_absent;
using detail::check_tensor;
using detail::Dim;

namespace softmax {

// f64 inputs are accepted so the reference can be checked by finite differences in fp64.
static const std::initializer_list<DType> kInputDtypes = {DType::F32, DType::BF16, DType::F16, DType::F64};
static const std::initializer_list<DType> kOutputDtypes = {DType::F32, DType::BF16, DType::F16, DType::F64};
static const std::initializer_list<DType> kF32 = {DType::F32};
static const std::initializer_list<DType> kIndex = {DType::I32, DType::I64};

// Head counts, head dim, scale, window: the checks forward and decode share.
static void check_heads_and_options(const char* op, const SoftmaxConfig& cfg, const TensorView& q, const TensorView& k,
                                    int64_t HQ, int64_t HKV, int64_t D, Backend backend, bool has_g, double& scale) {
    HLA_CHECK(HQ >= 1 && D >= 1, op, ": q: expected HQ >= 1 and D >= 1, got shape ", q.shape_string());
    HLA_CHECK(HKV >= 1, op, ": k: expected HKV >= 1, got shape ", k.shape_string());
    HLA_CHECK(HQ % HKV == 0, op, ": k: the query heads HQ = ", HQ, " must be a multiple of the key/value heads HKV = ",
              HKV, " (grouped-query attention)");
    if (backend == Backend::Cuda) {
        HLA_CHECK(D == 64 || D == 128 || D == 256, op, ": q: head dim D = ", D,
                  " is not supported by the CUDA backend (expected 64, 128 or 256)");
        HLA_CHECK(q.dtype == DType::BF16 || q.dtype == DType::F16, op,
                  ": q: the CUDA backend runs on tensor cores and expects dtype bf16 | f16, got ", dtype_name(q.dtype));
    } else {
        HLA_CHECK(D <= 256, op, ": q: head dim D = ", D, " is not supported (expected 1 <= D <= 256)");
    }
    HLA_CHECK(cfg.window >= 0, op, ": window: expected 0 (unlimited) or a positive number of tokens, got ",
              cfg.window);
    HLA_CHECK(cfg.causal || cfg.window == 0, op, ": window: a sliding window needs causal attention");
    HLA_CHECK(cfg.causal || !has_g, op, ": g: the forget-gate bias needs causal attention");
    if (cfg.scale) {
        HLA_CHECK(std::isfinite(*cfg.scale), op, ": scale: expected a finite number, got ", *cfg.scale);
        scale = *cfg.scale;
    } else {
        scale = 1.0 / std::sqrt(double(D));
    }
}

Problem make_forward_problem(const char* op, const SoftmaxConfig& cfg, const SoftmaxForwardArgs& a) {
    Problem p;
    p.op = op;
    p.cfg = cfg;
    p.args = a;
    HLA_CHECK(a.q.defined() && a.q.ndim == 4, op, ": q: expected rank 4 [B, T, HQ, D], got shape ",
              a.q.shape_string());
    HLA_CHECK(a.k.defined() && a.k.ndim == 4, op, ": k: expected rank 4 [B, T, HKV, D], got shape ",
              a.k.shape_string());
    const Device dev = a.q.device;
    const int di = a.q.device_index;
    p.B = a.q.shape[0];
    p.T = a.q.shape[1];
    p.HQ = a.q.shape[2];
    p.D = a.q.shape[3];
    p.HKV = a.k.shape[2];
    p.cfg.backend = detail::resolve_backend(op, cfg.backend, dev);
    check_heads_and_options(op, cfg, a.q, a.k, p.HQ, p.HKV, p.D, p.cfg.backend, a.g.defined(), p.scale);
    p.G = p.HQ / p.HKV;
    p.window = cfg.window;
    check_tensor(op, "q", a.q, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}, {"D", p.D}}, kInputDtypes, dev, di);
    check_tensor(op, "k", a.k, {{"B", p.B}, {"T", p.T}, {"HKV", p.HKV}, {"D", p.D}}, {a.q.dtype}, dev, di);
    check_tensor(op, "v", a.v, {{"B", p.B}, {"T", p.T}, {"HKV", p.HKV}, {"D", p.D}}, {a.q.dtype}, dev, di);
    check_tensor(op, "o", a.o, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}, {"D", p.D}}, kOutputDtypes, dev, di);
    if (a.g.defined()) check_tensor(op, "g", a.g, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}}, kInputDtypes, dev, di);
    if (a.gate.defined())
        check_tensor(op, "gate", a.gate, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}, {"D", p.D}}, kInputDtypes, dev, di);
    if (a.lse.defined()) check_tensor(op, "lse", a.lse, {{"B", p.B}, {"HQ", p.HQ}, {"T", p.T}}, kF32, dev, di);

    if (a.cu_seqlens.defined()) {
        HLA_CHECK(p.B == 1, op, ": cu_seqlens: variable-length packing needs B == 1, got B = ", p.B);
        detail::check_same_device(op, "cu_seqlens", a.cu_seqlens, dev, di);
        const std::vector<int64_t> off = detail::read_cu_seqlens(op, a.cu_seqlens, p.T);
        for (size_t n = 0; n + 1 < off.size(); ++n) p.seqs.push_back({0, off[n], off[n + 1] - off[n]});
    } else {
        for (int64_t b = 0; b < p.B; ++b) p.seqs.push_back({b, 0, p.T});
    }
    for (const Sequence& s : p.seqs) p.max_len = std::max(p.max_len, s.len);
    return p;
}

void check_backward_args(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g) {
    const char* op = p.op;
    const Device dev = p.args.q.device;
    const int di = p.args.q.device_index;
    HLA_CHECK(p.args.lse.defined(), op, ": lse: required, the log-sum-exp written by the forward (shape ",
              detail::dims_string({{"B", p.B}, {"HQ", p.HQ}, {"T", p.T}}), ")");
    check_tensor(op, "d_o", d_o, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}, {"D", p.D}}, kInputDtypes, dev, di);
    const std::initializer_list<Dim> qdims = {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}, {"D", p.D}};
    const std::initializer_list<Dim> kdims = {{"B", p.B}, {"T", p.T}, {"HKV", p.HKV}, {"D", p.D}};
    if (g.dq.defined()) check_tensor(op, "dq", g.dq, qdims, kOutputDtypes, dev, di);
    if (g.dk.defined()) check_tensor(op, "dk", g.dk, kdims, kOutputDtypes, dev, di);
    if (g.dv.defined()) check_tensor(op, "dv", g.dv, kdims, kOutputDtypes, dev, di);
    if (g.dg.defined()) {
        HLA_CHECK(p.has_g(), op, ": dg: the forward has no forget gate g");
        check_tensor(op, "dg", g.dg, {{"B", p.B}, {"T", p.T}, {"HQ", p.HQ}}, kF32, dev, di);
    }
    if (g.dgate.defined()) {
        HLA_CHECK(p.has_gate(), op, ": dgate: the forward has no output gate");
        check_tensor(op, "dgate", g.dgate, qdims, kOutputDtypes, dev, di);
    }
}

DecodeProblem make_decode_problem(const char* op, const SoftmaxConfig& cfg, const SoftmaxKVCacheArgs& a) {
    DecodeProblem p;
    p.op = op;
    p.cfg = cfg;
    p.args = a;
    HLA_CHECK(a.q.defined() && a.q.ndim == 4, op, ": q: expected rank 4 [N, TQ, HQ, D], got shape ",
              a.q.shape_string());
    HLA_CHECK(a.k_cache.defined() && a.k_cache.ndim == 4, op,
              ": k_cache: expected rank 4 [S, TC, HKV, D] (or paged [P, PS, HKV, D]), got shape ",
              a.k_cache.shape_string());
    const Device dev = a.q.device;
    const int di = a.q.device_index;
    p.N = a.q.shape[0];
    p.TQ = a.q.shape[1];
    p.HQ = a.q.shape[2];
    p.D = a.q.shape[3];
    p.HKV = a.k_cache.shape[2];
    p.slots = a.k_cache.shape[0];
    p.cfg.backend = detail::resolve_backend(op, cfg.backend, dev);
    check_heads_and_options(op, cfg, a.q, a.k_cache, p.HQ, p.HKV, p.D, p.cfg.backend,
                            a.g_cache.defined() || a.g.defined(), p.scale);
    p.G = p.HQ / p.HKV;
    p.window = cfg.window;
    const int64_t rows = a.k_cache.shape[1];
    check_tensor(op, "q", a.q, {{"N", p.N}, {"TQ", p.TQ}, {"HQ", p.HQ}, {"D", p.D}}, kInputDtypes, dev, di);
    const std::initializer_list<Dim> cdims = {{a.block_table.defined() ? "P" : "S", p.slots},
                                              {a.block_table.defined() ? "PS" : "TC", rows},
                                              {"HKV", p.HKV},
                                              {"D", p.D}};
    check_tensor(op, "k_cache", a.k_cache, cdims, {a.q.dtype}, dev, di);
    check_tensor(op, "v_cache", a.v_cache, cdims, {a.q.dtype}, dev, di);
    check_tensor(op, "o", a.o, {{"N", p.N}, {"TQ", p.TQ}, {"HQ", p.HQ}, {"D", p.D}}, kOutputDtypes, dev, di);
    if (a.gate.defined())
        check_tensor(op, "gate", a.gate, {{"N", p.N}, {"TQ", p.TQ}, {"HQ", p.HQ}, {"D", p.D}}, kInputDtypes, dev, di);
    if (a.lse.defined()) check_tensor(op, "lse", a.lse, {{"N", p.N}, {"HQ", p.HQ}, {"TQ", p.TQ}}, kF32, dev, di);

    if (a.block_table.defined()) {
        HLA_CHECK(a.block_table.ndim == 2, op, ": block_table: expected rank 2 [N, MB], got shape ",
                  a.block_table.shape_string());
        p.max_blocks = a.block_table.shape[1];
        check_tensor(op, "block_table", a.block_table, {{"N", p.N}, {"MB", p.max_blocks}}, {DType::I32}, dev, di);
        check_absent(op, "cache_batch_idx", a.cache_batch_idx, "a paged cache addresses pages through block_table");
        HLA_CHECK(rows >= 1, op, ": k_cache: pages of at least one token expected, got PS = ", rows);
        p.page_size = rows;
        p.capacity = p.max_blocks * rows;
    } else {
        p.capacity = rows;
        if (a.cache_batch_idx.defined()) {
            check_tensor(op, "cache_batch_idx", a.cache_batch_idx, {{"N", p.N}}, kIndex, dev, di);
        } else {
            HLA_CHECK(p.slots >= p.N, op, ": k_cache: without cache_batch_idx sequence n uses slot n, so S >= N = ",
                      p.N, " slots are needed, got S = ", p.slots);
        }
    }

    p.append = a.k.defined() || a.v.defined();
    if (p.append) {
        check_tensor(op, "k", a.k, {{"N", p.N}, {"TQ", p.TQ}, {"HKV", p.HKV}, {"D", p.D}}, {a.q.dtype}, dev, di);
        check_tensor(op, "v", a.v, {{"N", p.N}, {"TQ", p.TQ}, {"HKV", p.HKV}, {"D", p.D}}, {a.q.dtype}, dev, di);
        HLA_CHECK(a.cache_seqlens.defined(), op,
                  ": cache_seqlens: required when new k, v are appended (where to write them)");
        HLA_CHECK(p.capacity >= p.TQ, op, ": k_cache: cache too short: ", p.TQ,
                  " new tokens do not fit a capacity of ", p.capacity, " tokens per sequence");
    }
    if (a.cache_seqlens.defined()) {
        check_tensor(op, "cache_seqlens", a.cache_seqlens, {{"N", p.N}}, kIndex, dev, di);
        // Values are checked where they already are on the host; on CUDA reading them would be a
        // synchronisation per decode step, so the kernels clamp instead (documented in the header).
        if (dev == Device::CPU) {
            for (int64_t n = 0; n < p.N; ++n) {
                const int64_t len = detail::read_host_index(a.cache_seqlens, n);
                const int64_t need = len + (p.append ? p.TQ : 0);
                HLA_CHECK(len >= 0, op, ": cache_seqlens: expected non-negative lengths, got ", len, " for sequence ", n);
                HLA_CHECK(need <= p.capacity, op, ": k_cache: cache too short: sequence ", n, " needs ", need,
                          " tokens (cache_seqlens ", len, p.append ? " + new tokens " : "",
                          p.append ? std::to_string(p.TQ) : std::string(), ") but the cache holds ", p.capacity);
            }
        }
    }
    if (dev == Device::CPU) {
        if (a.cache_batch_idx.defined()) {
            for (int64_t n = 0; n < p.N; ++n) {
                const int64_t slot = detail::read_host_index(a.cache_batch_idx, n);
                HLA_CHECK(slot >= 0 && slot < p.slots, op, ": cache_batch_idx: entry ", n, " = ", slot,
                          " is outside [0, S = ", p.slots, ")");
            }
        }
        if (a.block_table.defined()) {
            const int32_t* bt = a.block_table.ptr<int32_t>();
            for (int64_t n = 0; n < p.N; ++n)
                for (int64_t b = 0; b < p.max_blocks; ++b) {
                    const int64_t page = bt[n * a.block_table.stride[0] + b * a.block_table.stride[1]];
                    HLA_CHECK(page >= 0 && page < p.slots, op, ": block_table: entry [", n, ", ", b, "] = ", page,
                              " is outside [0, P = ", p.slots, ")");
                }
        }
    }

    if (a.g_cache.defined()) {
        check_tensor(op, "g_cache", a.g_cache, {{a.block_table.defined() ? "P" : "S", p.slots},
                                                 {a.block_table.defined() ? "PS" : "TC", rows},
                                                 {"HQ", p.HQ}},
                     kF32, dev, di);
        if (p.append)
            check_tensor(op, "g", a.g, {{"N", p.N}, {"TQ", p.TQ}, {"HQ", p.HQ}}, kInputDtypes, dev, di);
        else
            check_absent(op, "g", a.g, "new gates are only appended together with new k, v");
    } else {
        check_absent(op, "g", a.g, "the gates of the cached tokens are needed too: pass g_cache");
    }
    return p;
}

}  // namespace softmax

// ---- public entry points -------------------------------------------------------------------------

#ifndef HLA_WITH_CUDA
namespace softmax::cuda {
[[noreturn]] static void no_cuda(const char* op) { detail::fail(op, ": this build of hla has no CUDA support"); }
void forward(const Problem& p) { no_cuda(p.op); }
void backward(const Problem& p, const TensorView&, const SoftmaxGrads&) { no_cuda(p.op); }
void decode(const DecodeProblem& p) { no_cuda(p.op); }
}  // namespace softmax::cuda
#endif

static void run_forward(const char* op, const SoftmaxConfig& cfg, const SoftmaxForwardArgs& args) {
    const softmax::Problem p = softmax::make_forward_problem(op, cfg, args);
    detail::on_backend(p.cfg.backend,
                       [&] { softmax::reference::forward(p); },
                       [&] { softmax::cpu::forward(p); },
                       [&] { softmax::cuda::forward(p); });
}

void softmax_attention_forward(const SoftmaxConfig& config, const SoftmaxForwardArgs& args) {
    run_forward("softmax_attention_forward", config, args);
}

void softmax_attention_backward(const SoftmaxConfig& config, const SoftmaxForwardArgs& args, const TensorView& d_o,
                                const SoftmaxGrads& grads) {
    const char* op = "softmax_attention_backward";
    HLA_CHECK(args.o.defined(), op, ": o: required, the output written by the forward");
    const softmax::Problem p = softmax::make_forward_problem(op, config, args);
    softmax::check_backward_args(p, d_o, grads);
    detail::on_backend(p.cfg.backend,
                       [&] { softmax::reference::backward(p, d_o, grads); },
                       [&] { softmax::cpu::backward(p, d_o, grads); },
                       [&] { softmax::cuda::backward(p, d_o, grads); });
}

static void run_kvcache(const char* op, const SoftmaxConfig& cfg, const SoftmaxKVCacheArgs& args) {
    const softmax::DecodeProblem p = softmax::make_decode_problem(op, cfg, args);
    detail::on_backend(p.cfg.backend,
                       [&] { softmax::reference::decode(p); },
                       [&] { softmax::cpu::decode(p); },
                       [&] { softmax::cuda::decode(p); });
}

void softmax_attention_kvcache(const SoftmaxConfig& config, const SoftmaxKVCacheArgs& args) {
    run_kvcache("softmax_attention_kvcache", config, args);
}

static SoftmaxConfig config_of(const FlashAttnOptions& opt) {
    SoftmaxConfig c;
    c.causal = opt.causal;
    c.window = opt.window;
    c.scale = opt.softmax_scale;
    c.backend = opt.backend;
    return c;
}

static SoftmaxForwardArgs forward_args(TensorView q, TensorView k, TensorView v, TensorView o,
                                       const FlashAttnOptions& opt) {
    SoftmaxForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.g = opt.g;
    a.gate = opt.gate;
    a.lse = opt.softmax_lse;
    return a;
}

void flash_attn_func(TensorView q, TensorView k, TensorView v, TensorView o, const FlashAttnOptions& opt) {
    run_forward("flash_attn_func", config_of(opt), forward_args(q, k, v, o, opt));
}

void flash_attn_varlen_func(TensorView q, TensorView k, TensorView v, TensorView cu_seqlens, TensorView o,
                            const FlashAttnOptions& opt) {
    SoftmaxForwardArgs a = forward_args(q, k, v, o, opt);
    HLA_CHECK(cu_seqlens.defined(), "flash_attn_varlen_func: cu_seqlens: required, got none");
    a.cu_seqlens = cu_seqlens;
    run_forward("flash_attn_varlen_func", config_of(opt), a);
}

void flash_attn_with_kvcache(TensorView q, TensorView k_cache, TensorView v_cache, TensorView cache_seqlens,
                             TensorView o, const KVCacheOptions& opt) {
    SoftmaxConfig c;
    c.causal = opt.causal;
    c.window = opt.window;
    c.scale = opt.softmax_scale;
    c.backend = opt.backend;
    SoftmaxKVCacheArgs a;
    a.q = q;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.cache_seqlens = cache_seqlens;
    a.k = opt.k;
    a.v = opt.v;
    a.cache_batch_idx = opt.cache_batch_idx;
    a.block_table = opt.block_table;
    a.g_cache = opt.g_cache;
    a.g = opt.g;
    a.gate = opt.gate;
    a.o = o;
    a.lse = opt.softmax_lse;
    run_kvcache("flash_attn_with_kvcache", c, a);
}

}  // namespace hla
