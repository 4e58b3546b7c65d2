// hla tests — the softmax family on the CPU: the fp64 reference checked by finite differences, the CPU
// backend against the reference (forward, backward, KV-cache decode), adversarial inputs, and errors.
//
// Input ranges: q, k, v ~ N(0, 1) (q up to ×50 for the large-logit case); log forget gates uniform in
// [−0.5, 0] (and [−1000, −500] for the saturated case); output-gate logits ~ N(0, 2²).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "ops/softmax/problem.hpp"
#include "support/softmax_case.hpp"

namespace hla::test::sm {
namespace {

struct FwdOut {
    Tensor o, lse;
};

FwdOut run_forward(const SoftmaxCase& c, const SoftmaxInputs& in, Backend backend) {
    FwdOut r{poisoned({c.B, c.T, c.HQ, c.D}, c.out_dtype), poisoned({c.B, c.HQ, c.T}, DType::F32)};
    SoftmaxConfig cfg = c.cfg;
    cfg.backend = backend;
    softmax_attention_forward(cfg, in.args(r.o, &r.lse));
    return r;
}

// The reference evaluated in precision P (tolerance policy).
FwdOut run_forward_in_precision(const SoftmaxCase& c, const SoftmaxInputs& in) {
    FwdOut r{poisoned({c.B, c.T, c.HQ, c.D}, c.out_dtype), poisoned({c.B, c.HQ, c.T}, DType::F32)};
    SoftmaxConfig cfg = c.cfg;
    cfg.backend = Backend::Reference;
    const softmax::Problem p = softmax::make_forward_problem("test", cfg, in.args(r.o, &r.lse));
    softmax::reference::forward_in_precision(p, c.dtype);
    return r;
}

GradTensors run_backward(const SoftmaxCase& c, const SoftmaxInputs& in, const FwdOut& fwd, Backend backend,
                         bool in_precision = false) {
    GradTensors g = poisoned_grads(c, c.out_dtype);
    SoftmaxConfig cfg = c.cfg;
    cfg.backend = backend;
    if (in_precision) {
        const softmax::Problem p = softmax::make_forward_problem("test", cfg, in.args(fwd.o, &fwd.lse));
        softmax::reference::backward_in_precision(p, in.d_o, g.views(), c.dtype);
    } else {
        softmax_attention_backward(cfg, in.args(fwd.o, &fwd.lse), in.d_o, g.views());
    }
    return g;
}

// ---- the reference backward by finite differences (fp64) ---------------------------------------------

TEST(SoftmaxReference, BackwardMatchesFiniteDifferences) {
    for (int variant = 0; variant < 3; ++variant) {
        SoftmaxCase c;
        c.B = 2;
        c.T = 6;
        c.HQ = 4;
        c.HKV = 2;
        c.D = 3;
        c.dtype = c.out_dtype = DType::F64;
        c.forget_gate = variant != 1;
        c.output_gate = variant != 2;
        c.cfg.window = variant == 0 ? 4 : 0;
        c.g_min = -1.0;
        SoftmaxInputs in = make_inputs(c, 11 + variant);
        const FwdOut fwd = run_forward(c, in, Backend::Reference);
        const GradTensors g = run_backward(c, in, fwd, Backend::Reference);
        auto loss = [&]() {
            const FwdOut f = run_forward(c, in, Backend::Reference);
            double L = 0;
            for (int64_t i = 0; i < f.o.numel(); ++i) L += f.o.ptr<double>()[i] * in.d_o.ptr<double>()[i];
            return L;
        };
        const double eps = 1e-6;
        auto check = [&](const char* name, Tensor& x, const Tensor& grad) {
            double num = 0, den = 0;
            for (int64_t i = 0; i < x.numel(); ++i) {
                double& xi = x.ptr<double>()[i];
                const double keep = xi;
                xi = keep + eps;
                const double up = loss();
                xi = keep - eps;
                const double down = loss();
                xi = keep;
                const double fd = (up - down) / (2 * eps);
                const double an = load_as_double(grad.data(), grad.dtype(), i);
                num += (fd - an) * (fd - an);
                den += fd * fd;
            }
            EXPECT_LT(std::sqrt(num / std::max(den, 1e-300)), 1e-6) << name << " (variant " << variant << ")";
        };
        check("dq", in.q, g.dq);
        check("dk", in.k, g.dk);
        check("dv", in.v, g.dv);
        if (c.forget_gate) check("dg", in.g, g.dg);
        if (c.output_gate) check("dgate", in.gate, g.dgate);
    }
}

// ---- CPU against the reference -------------------------------------------------------------------------

struct Named {
    const char* name;
    SoftmaxCase c;
};

std::vector<Named> cpu_cases() {
    std::vector<Named> v;
    auto add = [&](const char* name, auto&& edit) {
        SoftmaxCase c;
        c.T = 77;
        edit(c);
        v.push_back({name, c});
    };
    add("causal_gqa", [](SoftmaxCase&) {});
    add("mha_d64", [](SoftmaxCase& c) { c.HKV = 4, c.D = 64; });
    add("mqa", [](SoftmaxCase& c) { c.HKV = 1; });
    add("noncausal", [](SoftmaxCase& c) { c.cfg.causal = false; });
    add("window_7", [](SoftmaxCase& c) { c.cfg.window = 7; });
    add("window_1", [](SoftmaxCase& c) { c.cfg.window = 1; });
    add("window_ge_T", [](SoftmaxCase& c) { c.cfg.window = 200; });
    add("forget_gate", [](SoftmaxCase& c) { c.forget_gate = true; });
    add("output_gate", [](SoftmaxCase& c) { c.output_gate = true; });
    add("all_options", [](SoftmaxCase& c) {
        c.forget_gate = c.output_gate = true;
        c.cfg.window = 20;
        c.cfg.scale = 0.3;
    });
    add("T1", [](SoftmaxCase& c) {
        c.T = 1;
        c.forget_gate = c.output_gate = true;
    });
    add("two_tiles_b2", [](SoftmaxCase& c) {
        c.B = 2;
        c.T = 150;
        c.forget_gate = true;
    });
    add("varlen_empty", [](SoftmaxCase& c) {
        c.T = 140;
        c.cu_seqlens = {0, 0, 65, 65, 66, 140, 140};
        c.forget_gate = c.output_gate = true;
    });
    add("large_logits", [](SoftmaxCase& c) { c.q_scale = 50; });
    add("saturated_forget_gate", [](SoftmaxCase& c) {
        c.forget_gate = true;
        c.g_min = -1000, c.g_max = -500;
    });
    add("bf16_all_options", [](SoftmaxCase& c) {
        c.dtype = c.out_dtype = DType::BF16;
        c.forget_gate = c.output_gate = true;
        c.cfg.window = 30;
        c.T = 130;
        c.D = 64;
    });
    add("f16_d128", [](SoftmaxCase& c) {
        c.dtype = c.out_dtype = DType::F16;
        c.D = 128;
    });
    return v;
}

TEST(SoftmaxCpu, MatchesReferenceForwardAndBackward) {
    for (const Named& nc : cpu_cases()) {
        SCOPED_TRACE(nc.name);
        const SoftmaxCase& c = nc.c;
        const SoftmaxInputs in = make_inputs(c, 3);
        const FwdOut ref = run_forward(c, in, Backend::Reference);
        const FwdOut refp = run_forward_in_precision(c, in);
        const FwdOut cpu = run_forward(c, in, Backend::Cpu);
        const double floor = c.dtype == DType::F32 ? (c.q_scale > 1 ? 1e-4 : 1e-5) : 1e-3;
        expect_close(std::string(nc.name) + " o", cpu.o, ref.o, refp.o, floor);
        expect_close(std::string(nc.name) + " lse", cpu.lse, ref.lse, refp.lse, floor);

        // Gradients are O(1) for unit inputs; rounding noise of a vanishing one stays far below these.
        const double abs_floor = c.dtype == DType::F32 ? 1e-5 : 1e-3;
        // Backward from each path's own forward outputs (FlashAttention-style), against the fp64 oracle.
        const GradTensors gref = run_backward(c, in, ref, Backend::Reference);
        const GradTensors gp = run_backward(c, in, refp, Backend::Reference, true);
        const GradTensors gcpu = run_backward(c, in, cpu, Backend::Cpu);
        expect_close(std::string(nc.name) + " dq", gcpu.dq, gref.dq, gp.dq, floor, abs_floor);
        expect_close(std::string(nc.name) + " dk", gcpu.dk, gref.dk, gp.dk, floor, abs_floor);
        expect_close(std::string(nc.name) + " dv", gcpu.dv, gref.dv, gp.dv, floor, abs_floor);
        if (c.forget_gate) expect_close(std::string(nc.name) + " dg", gcpu.dg, gref.dg, gp.dg, floor);
        if (c.output_gate) expect_close(std::string(nc.name) + " dgate", gcpu.dgate, gref.dgate, gp.dgate, floor);
    }
}

TEST(SoftmaxCpu, WindowOneCopiesTheValue) {
    SoftmaxCase c;
    c.T = 33;
    c.cfg.window = 1;
    const SoftmaxInputs in = make_inputs(c, 5);
    const FwdOut cpu = run_forward(c, in, Backend::Cpu);
    for (int64_t t = 0; t < c.T; ++t)
        for (int64_t h = 0; h < c.HQ; ++h)
            for (int64_t d = 0; d < c.D; ++d) {
                const float o = cpu.o.ptr<float>()[(t * c.HQ + h) * c.D + d];
                const float v = in.v.ptr<float>()[(t * c.HKV + h / (c.HQ / c.HKV)) * c.D + d];
                ASSERT_FLOAT_EQ(o, v) << "t " << t << " h " << h;
            }
}

TEST(SoftmaxCpu, WindowAtLeastTEqualsFullCausal) {
    SoftmaxCase c;
    c.T = 70;
    c.forget_gate = true;
    const SoftmaxInputs in = make_inputs(c, 6);
    const FwdOut full = run_forward(c, in, Backend::Cpu);
    c.cfg.window = c.T;
    const FwdOut win = run_forward(c, in, Backend::Cpu);
    expect_close_abs("window T vs full", win.o, full.o, 0.0);
}

// ---- KV cache ------------------------------------------------------------------------------------------

enum class Layout { Contiguous, Permuted, Paged };

// N sequences with L_n cached tokens and TQ new ones. The full forward over each packed sequence of
// L_n + TQ tokens is the oracle for the decode's TQ outputs.
void check_decode_against_forward(Layout layout, int64_t TQ, bool gates, int64_t window, bool append) {
    const std::vector<int64_t> L = {5, 0, 17, 64};
    const int64_t N = int64_t(L.size());
    SoftmaxCase c;
    c.cfg.window = window;
    c.forget_gate = c.output_gate = gates;
    c.cu_seqlens = {0};
    for (int64_t l : L) c.cu_seqlens.push_back(c.cu_seqlens.back() + l + TQ);
    c.T = c.cu_seqlens.back();
    const SoftmaxInputs in = make_inputs(c, 21);
    const FwdOut full = run_forward(c, in, Backend::Cpu);
    const FwdOut full_ref = run_forward(c, in, Backend::Reference);

    const int64_t HKV = c.HKV, HQ = c.HQ, D = c.D, PS = 8, MB = 18, TC = 144;
    const bool paged = layout == Layout::Paged;
    const int64_t S = paged ? N * MB + 3 : N + 2;
    const int64_t rows = paged ? PS : TC;
    std::vector<int64_t> slot(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) slot[size_t(n)] = layout == Layout::Permuted ? (n * 5 + 1) % S : n;
    Tensor bt;
    if (paged) {
        // Pages handed out in a scrambled order so that a layout bug cannot pass by accident.
        bt = Tensor({N, MB}, DType::I32);
        for (int64_t i = 0; i < N * MB; ++i) bt.ptr<int32_t>()[i] = int32_t((i * 7 + 2) % (N * MB + 3));
    }
    auto cache_pos = [&](int64_t n, int64_t t) {  // element offset of (n, t, head 0) without the head stride
        if (paged) return (int64_t(bt.ptr<int32_t>()[n * MB + t / PS]) * PS + t % PS);
        return slot[size_t(n)] * TC + t;
    };
    for (Backend backend : {Backend::Reference, Backend::Cpu}) {
        SCOPED_TRACE(backend == Backend::Cpu ? "cpu" : "reference");
        Tensor kc = poisoned({S, rows, HKV, D}, DType::F32), vc = poisoned({S, rows, HKV, D}, DType::F32);
        Tensor gc = poisoned({S, rows, HQ}, DType::F32);
        Tensor q({N, TQ, HQ, D}, DType::F32), kn({N, TQ, HKV, D}, DType::F32), vn({N, TQ, HKV, D}, DType::F32);
        Tensor gn({N, TQ, HQ}, DType::F32), zn({N, TQ, HQ, D}, DType::F32);
        Tensor lens({N}, DType::I32);
        const int64_t cached_tokens = append ? 0 : TQ;  // without append the cache already holds the new tokens
        for (int64_t n = 0; n < N; ++n) {
            const int64_t base = c.cu_seqlens[size_t(n)];
            lens.ptr<int32_t>()[n] = int32_t(L[size_t(n)] + cached_tokens);
            for (int64_t t = 0; t < L[size_t(n)] + TQ; ++t) {
                const int64_t src = base + t;
                const bool cached = t < L[size_t(n)] + cached_tokens;
                const int64_t tn = t - L[size_t(n)];
                for (int64_t h = 0; h < HKV; ++h)
                    for (int64_t d = 0; d < D; ++d) {
                        const float kx = in.k.ptr<float>()[(src * HKV + h) * D + d];
                        const float vx = in.v.ptr<float>()[(src * HKV + h) * D + d];
                        if (cached) {
                            kc.ptr<float>()[(cache_pos(n, t) * HKV + h) * D + d] = kx;
                            vc.ptr<float>()[(cache_pos(n, t) * HKV + h) * D + d] = vx;
                        } else {
                            kn.ptr<float>()[((n * TQ + tn) * HKV + h) * D + d] = kx;
                            vn.ptr<float>()[((n * TQ + tn) * HKV + h) * D + d] = vx;
                        }
                    }
                for (int64_t h = 0; h < HQ; ++h) {
                    const float gx = gates ? in.g.ptr<float>()[src * HQ + h] : 0.0f;
                    if (cached)
                        gc.ptr<float>()[cache_pos(n, t) * HQ + h] = gx;
                    else
                        gn.ptr<float>()[(n * TQ + tn) * HQ + h] = gx;
                }
                if (tn >= 0)
                    for (int64_t h = 0; h < HQ; ++h)
                        for (int64_t d = 0; d < D; ++d) {
                            q.ptr<float>()[((n * TQ + tn) * HQ + h) * D + d] = in.q.ptr<float>()[(src * HQ + h) * D + d];
                            if (gates)
                                zn.ptr<float>()[((n * TQ + tn) * HQ + h) * D + d] =
                                    in.gate.ptr<float>()[(src * HQ + h) * D + d];
                        }
            }
        }
        Tensor slots({N}, DType::I64);
        for (int64_t n = 0; n < N; ++n) slots.ptr<int64_t>()[n] = slot[size_t(n)];
        Tensor o = poisoned({N, TQ, HQ, D}, DType::F32), lse = poisoned({N, HQ, TQ}, DType::F32);
        KVCacheOptions opt;
        opt.window = window;
        opt.backend = backend;
        opt.softmax_lse = lse;
        if (append) {
            opt.k = kn;
            opt.v = vn;
        }
        if (layout == Layout::Permuted) opt.cache_batch_idx = slots;
        if (paged) opt.block_table = bt;
        if (gates) {
            opt.g_cache = gc;
            if (append) opt.g = gn;
            opt.gate = zn;
        }
        flash_attn_with_kvcache(q, kc, vc, lens, o, opt);
        // Gather the oracle rows.
        Tensor want({N, TQ, HQ, D}, DType::F32), want_lse({N, HQ, TQ}, DType::F32);
        const FwdOut& oracle = backend == Backend::Cpu ? full : full_ref;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < TQ; ++t) {
                const int64_t src = c.cu_seqlens[size_t(n)] + L[size_t(n)] + t;
                for (int64_t h = 0; h < HQ; ++h) {
                    for (int64_t d = 0; d < D; ++d)
                        want.ptr<float>()[((n * TQ + t) * HQ + h) * D + d] = oracle.o.ptr<float>()[(src * HQ + h) * D + d];
                    want_lse.ptr<float>()[(n * HQ + h) * TQ + t] = oracle.lse.ptr<float>()[h * c.T + src];
                }
            }
        expect_close_abs("decode o", o, want, 2e-6);
        expect_close_abs("decode lse", lse, want_lse, 2e-6);
    }
}

TEST(SoftmaxDecode, ContiguousSingleToken) { check_decode_against_forward(Layout::Contiguous, 1, false, 0, true); }
TEST(SoftmaxDecode, PermutedSlotsSmallTq) { check_decode_against_forward(Layout::Permuted, 4, true, 0, true); }
TEST(SoftmaxDecode, PagedWithGatesAndWindow) { check_decode_against_forward(Layout::Paged, 3, true, 9, true); }
TEST(SoftmaxDecode, ChunkedPrefillPaged) { check_decode_against_forward(Layout::Paged, 70, true, 0, true); }
TEST(SoftmaxDecode, PreAppendedCache) { check_decode_against_forward(Layout::Contiguous, 2, true, 5, false); }

TEST(SoftmaxDecode, RowsThatSeeNoKeyAreZeroNotNaN) {
    // Key length 1 with 3 bottom-right aligned queries: positions −2, −1, 0; only the last sees a key.
    const int64_t HQ = 2, D = 8, TQ = 3;
    Tensor q = randn({1, TQ, HQ, D}, DType::F32, 1), kc = randn({1, 4, 1, D}, DType::F32, 2),
           vc = randn({1, 4, 1, D}, DType::F32, 3);
    Tensor lens({1}, DType::I32);
    lens.ptr<int32_t>()[0] = 1;
    for (Backend b : {Backend::Reference, Backend::Cpu}) {
        Tensor o = poisoned({1, TQ, HQ, D}, DType::F32), lse = poisoned({1, HQ, TQ}, DType::F32);
        KVCacheOptions opt;
        opt.backend = b;
        opt.softmax_lse = lse;
        flash_attn_with_kvcache(q, kc, vc, lens, o, opt);
        for (int64_t h = 0; h < HQ; ++h) {
            for (int64_t t = 0; t < TQ; ++t)
                for (int64_t d = 0; d < D; ++d) {
                    const float x = o.ptr<float>()[(t * HQ + h) * D + d];
                    ASSERT_FALSE(std::isnan(x));
                    EXPECT_FLOAT_EQ(x, t < 2 ? 0.0f : vc.ptr<float>()[d]);
                }
            EXPECT_TRUE(std::isinf(lse.ptr<float>()[h * TQ + 0]) && lse.ptr<float>()[h * TQ + 0] < 0);
            EXPECT_TRUE(std::isfinite(lse.ptr<float>()[h * TQ + 2]));
        }
    }
}

// ---- errors --------------------------------------------------------------------------------------------

void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
    try {
        fn();
        ADD_FAILURE() << "no hla::Error thrown";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const char* part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "message: " << msg;
    }
}

TEST(SoftmaxErrors, BadArgumentsNameTheArgument) {
    SoftmaxCase c;
    c.T = 8;
    const SoftmaxInputs in = make_inputs(c, 1);
    Tensor o({c.B, c.T, c.HQ, c.D}, DType::F32);
    {
        Tensor k3 = randn({1, 8, 3, c.D}, DType::F32, 1);
        expect_error([&] { flash_attn_func(in.q, k3, k3, o); }, {"flash_attn_func", "k:", "multiple", "HKV = 3"});
    }
    {
        Tensor q = randn({1, 8, 2, 300}, DType::F32, 1), k = randn({1, 8, 2, 300}, DType::F32, 2);
        Tensor o2({1, 8, 2, 300}, DType::F32);
        expect_error([&] { flash_attn_func(q, k, k, o2); }, {"q:", "head dim D = 300"});
    }
    {
        Tensor v_bad = randn({1, 8, 2, 16}, DType::F32, 1);
        expect_error([&] { flash_attn_func(in.q, in.k, v_bad, o); }, {"v:", "expected shape"});
    }
    {
        FlashAttnOptions opt;
        opt.causal = false;
        opt.window = 4;
        expect_error([&] { flash_attn_func(in.q, in.k, in.v, o, opt); }, {"window", "causal"});
    }
    {
        Tensor lse({c.B, c.T, c.HQ}, DType::F32);
        FlashAttnOptions opt;
        opt.softmax_lse = lse;
        expect_error([&] { flash_attn_func(in.q, in.k, in.v, o, opt); }, {"lse:", "expected shape"});
    }
    {
        // Backward without the forward's lse.
        GradTensors g = poisoned_grads(c, DType::F32);
        expect_error([&] { softmax_attention_backward({}, in.args(o), in.d_o, g.views()); }, {"lse:", "required"});
    }
    {
        // Cache too short: 6 cached + 3 new tokens in a cache of 8.
        Tensor q = randn({1, 3, 4, 16}, DType::F32, 1), kc = randn({1, 8, 2, 16}, DType::F32, 2);
        Tensor kn = randn({1, 3, 2, 16}, DType::F32, 3), o3({1, 3, 4, 16}, DType::F32);
        Tensor lens({1}, DType::I32);
        lens.ptr<int32_t>()[0] = 6;
        KVCacheOptions opt;
        opt.k = kn;
        opt.v = kn;
        expect_error([&] { flash_attn_with_kvcache(q, kc, kc, lens, o3, opt); }, {"cache too short", "needs 9"});
        KVCacheOptions no_g_cache;
        no_g_cache.k = kn;
        no_g_cache.v = kn;
        no_g_cache.g = randn({1, 3, 4}, DType::F32, 4);
        lens.ptr<int32_t>()[0] = 0;
        expect_error([&] { flash_attn_with_kvcache(q, kc, kc, lens, o3, no_g_cache); }, {"g:", "g_cache"});
    }
    {
        // A varlen batch must be packed (B == 1).
        SoftmaxCase c2 = c;
        c2.B = 2;
        const SoftmaxInputs in2 = make_inputs(c2, 2);
        Tensor o2({2, c.T, c.HQ, c.D}, DType::F32);
        Tensor cu({2}, DType::I32);
        cu.ptr<int32_t>()[0] = 0;
        cu.ptr<int32_t>()[1] = int32_t(c.T);
        expect_error([&] { flash_attn_varlen_func(in2.q, in2.k, in2.v, cu, o2); }, {"cu_seqlens", "B == 1"});
    }
}

}  // namespace
}  // namespace hla::test::sm
