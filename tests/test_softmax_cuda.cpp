// hla tests — the softmax family on CUDA against the fp64 reference: forward, backward and KV-cache
// decode for head dims 64/128/256 in bf16 and f16, with every option. Skips without a GPU.
//
// Input ranges: q, k, v ~ N(0, 1); log forget gates uniform in [−0.5, 0]; output-gate logits ~ N(0, 2²).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "ops/softmax/problem.hpp"
#include "support/cuda_graph.hpp"
#include "support/softmax_case.hpp"

namespace hla::test::sm {
namespace {

#define SKIP_WITHOUT_GPU() \
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device: the CUDA backend is compiled but not run"

struct FwdOut {
    Tensor o, lse;
};

FwdOut forward_on(const SoftmaxCase& c, const SoftmaxInputs& in, Device dev, Backend backend) {
    FwdOut r{poisoned({c.B, c.T, c.HQ, c.D}, c.out_dtype, dev), poisoned({c.B, c.HQ, c.T}, DType::F32, dev)};
    SoftmaxConfig cfg = c.cfg;
    cfg.backend = backend;
    softmax_attention_forward(cfg, in.args(r.o, &r.lse));
    return r;
}

FwdOut forward_in_precision(const SoftmaxCase& c, const SoftmaxInputs& in) {
    FwdOut r{poisoned({c.B, c.T, c.HQ, c.D}, c.out_dtype), poisoned({c.B, c.HQ, c.T}, DType::F32)};
    SoftmaxConfig cfg = c.cfg;
    cfg.backend = Backend::Reference;
    softmax::reference::forward_in_precision(softmax::make_forward_problem("test", cfg, in.args(r.o, &r.lse)), c.dtype);
    return r;
}

struct Named {
    std::string name;
    SoftmaxCase c;
};

std::vector<Named> gpu_cases() {
    std::vector<Named> v;
    for (int64_t D : {64, 128, 256})
        for (DType dt : {DType::BF16, DType::F16}) {
            SoftmaxCase c;
            c.D = D;
            c.dtype = c.out_dtype = dt;
            c.T = 200;
            c.B = 2;
            const std::string base = std::string(dtype_name(dt)) + "_d" + std::to_string(D);
            v.push_back({base + "_causal_gqa", c});
            SoftmaxCase w = c;
            w.cfg.window = 37;
            w.forget_gate = w.output_gate = true;
            v.push_back({base + "_window_gates", w});
        }
    auto add = [&](const std::string& name, auto&& edit) {
        SoftmaxCase c;
        c.D = 128;
        c.dtype = c.out_dtype = DType::BF16;
        c.T = 150;
        edit(c);
        v.push_back({name, c});
    };
    add("noncausal_mqa", [](SoftmaxCase& c) {
        c.cfg.causal = false;
        c.HKV = 1;
    });
    add("varlen_empty_gates", [](SoftmaxCase& c) {
        c.T = 400;
        c.cu_seqlens = {0, 0, 129, 130, 130, 400};
        c.forget_gate = c.output_gate = true;
    });
    add("T1", [](SoftmaxCase& c) { c.T = 1; });
    add("window1", [](SoftmaxCase& c) { c.cfg.window = 1; });
    add("f32_outputs_scale", [](SoftmaxCase& c) {
        c.out_dtype = DType::F32;
        c.cfg.scale = 0.05;
        c.forget_gate = true;
    });
    add("long_1024", [](SoftmaxCase& c) {
        c.T = 1024;
        c.HQ = 2;
        c.HKV = 1;
        c.forget_gate = true;
    });
    return v;
}

TEST(SoftmaxCuda, ForwardAndBackwardMatchReference) {
    SKIP_WITHOUT_GPU();
    for (const Named& nc : gpu_cases()) {
        SCOPED_TRACE(nc.name);
        const SoftmaxCase& c = nc.c;
        const SoftmaxInputs in = make_inputs(c, 9);
        const SoftmaxInputs gin = in.to(Device::CUDA);
        const FwdOut ref = forward_on(c, in, Device::CPU, Backend::Reference);
        const FwdOut refp = forward_in_precision(c, in);
        const FwdOut gpu = forward_on(c, gin, Device::CUDA, Backend::Cuda);
        cuda_synchronize();
        expect_close(nc.name + " o", gpu.o, ref.o, refp.o, 1e-3);
        expect_close(nc.name + " lse", gpu.lse, ref.lse, refp.lse, 1e-4);

        // Backward from each path's own forward outputs.
        GradTensors gref = poisoned_grads(c, DType::F32), gp = poisoned_grads(c, c.dtype);
        GradTensors ggpu = poisoned_grads(c, DType::F32, Device::CUDA);
        SoftmaxConfig rc = c.cfg;
        rc.backend = Backend::Reference;
        softmax_attention_backward(rc, in.args(ref.o, &ref.lse), in.d_o, gref.views());
        softmax::reference::backward_in_precision(softmax::make_forward_problem("test", rc, in.args(refp.o, &refp.lse)),
                                                  in.d_o, gp.views(), c.dtype);
        SoftmaxConfig gc = c.cfg;
        gc.backend = Backend::Cuda;
        softmax_attention_backward(gc, gin.args(gpu.o, &gpu.lse), gin.d_o, ggpu.views());
        cuda_synchronize();
        expect_close(nc.name + " dq", ggpu.dq, gref.dq, gp.dq, 1e-3, 1e-3);
        expect_close(nc.name + " dk", ggpu.dk, gref.dk, gp.dk, 1e-3, 1e-3);
        expect_close(nc.name + " dv", ggpu.dv, gref.dv, gp.dv, 1e-3, 1e-3);
        if (c.forget_gate) expect_close(nc.name + " dg", ggpu.dg, gref.dg, gp.dg, 1e-3, 1e-3);
        if (c.output_gate) expect_close(nc.name + " dgate", ggpu.dgate, gref.dgate, gp.dgate, 1e-3, 1e-3);
    }
}

TEST(SoftmaxCuda, LargeLogitsStayFinite) {
    SKIP_WITHOUT_GPU();
    SoftmaxCase c;
    c.D = 64;
    c.T = 130;
    c.dtype = c.out_dtype = DType::BF16;
    c.q_scale = 50;
    const SoftmaxInputs in = make_inputs(c, 4);
    const FwdOut ref = forward_on(c, in, Device::CPU, Backend::Reference);
    const FwdOut refp = forward_in_precision(c, in);
    const FwdOut gpu = forward_on(c, in.to(Device::CUDA), Device::CUDA, Backend::Cuda);
    expect_close("large logits o", gpu.o, ref.o, refp.o, 1e-3);
}

// Decode against the reference decode on a CPU copy of the same cache (contiguous with permuted slots,
// and paged), with new tokens appended, gates, a window and small T_q.
void decode_case(bool paged, int64_t TQ, int64_t D, bool gates, int64_t window, int64_t splits_hint_len) {
    const int64_t N = 5, HQ = 8, HKV = 2, PS = 16, MB = (splits_hint_len + 64) / 16 + 1;
    const int64_t TC = MB * PS;
    const int64_t S = paged ? N * MB + 1 : N + 1;
    const int64_t rows = paged ? PS : TC;
    const DType dt = DType::BF16;
    Tensor kc = randn({S, rows, HKV, D}, dt, 1), vc = randn({S, rows, HKV, D}, dt, 2);
    Tensor gc({S, rows, HQ}, DType::F32);
    {
        Tensor u = randn({S, rows, HQ}, DType::F32, 3, 0.2);
        for (int64_t i = 0; i < gc.numel(); ++i) gc.ptr<float>()[i] = -std::abs(u.ptr<float>()[i]);
    }
    Tensor q = randn({N, TQ, HQ, D}, dt, 4), kn = randn({N, TQ, HKV, D}, dt, 5), vn = randn({N, TQ, HKV, D}, dt, 6);
    Tensor gn({N, TQ, HQ}, DType::F32), z = randn({N, TQ, HQ, D}, dt, 8, 2.0);
    for (int64_t i = 0; i < gn.numel(); ++i) gn.ptr<float>()[i] = -0.1f * float(i % 7);
    Tensor lens({N}, DType::I32), idx({N}, DType::I32), bt;
    const int64_t L[N] = {0, 1, 37, splits_hint_len, splits_hint_len / 2};
    for (int64_t n = 0; n < N; ++n) {
        lens.ptr<int32_t>()[n] = int32_t(L[n]);
        idx.ptr<int32_t>()[n] = int32_t((n + 2) % S);
    }
    if (paged) {
        bt = Tensor({N, MB}, DType::I32);
        // Distinct pages in a scrambled order, so a layout bug cannot pass by accident.
        std::vector<int32_t> pages(static_cast<size_t>(S));
        std::iota(pages.begin(), pages.end(), 0);
        std::shuffle(pages.begin(), pages.end(), std::mt19937(7));
        for (int64_t i = 0; i < N * MB; ++i) bt.ptr<int32_t>()[i] = pages[size_t(i)];
    }
    auto run = [&](Device dev, Backend backend, Tensor& kc_d, Tensor& vc_d, Tensor& gc_d) {
        Tensor o = poisoned({N, TQ, HQ, D}, DType::F32, dev), lse = poisoned({N, HQ, TQ}, DType::F32, dev);
        // Every device copy is a named Tensor: a view of a temporary would dangle before the call.
        Tensor kn_d = kn.to(dev), vn_d = vn.to(dev), q_d = q.to(dev), lens_d = lens.to(dev);
        KVCacheOptions opt;
        opt.k = kn_d;
        opt.v = vn_d;
        opt.window = window;
        opt.backend = backend;
        opt.softmax_lse = lse;
        Tensor idx_d = idx.to(dev), bt_d = paged ? bt.to(dev) : Tensor(), gn_d = gn.to(dev), z_d = z.to(dev);
        if (paged)
            opt.block_table = bt_d;
        else
            opt.cache_batch_idx = idx_d;
        if (gates) {
            opt.g_cache = gc_d;
            opt.g = gn_d;
            opt.gate = z_d;
        }
        flash_attn_with_kvcache(q_d, kc_d, vc_d, lens_d, o, opt);
        return FwdOut{o.to(Device::CPU), lse.to(Device::CPU)};
    };
    Tensor kc_cpu = kc.clone(), vc_cpu = vc.clone(), gc_cpu = gc.clone();
    Tensor kc_gpu = kc.to(Device::CUDA), vc_gpu = vc.to(Device::CUDA), gc_gpu = gc.to(Device::CUDA);
    const FwdOut ref = run(Device::CPU, Backend::Reference, kc_cpu, vc_cpu, gc_cpu);
    const FwdOut gpu = run(Device::CUDA, Backend::Cuda, kc_gpu, vc_gpu, gc_gpu);
    // fp32 accumulation of bf16 inputs, fp32 outputs: only summation order differs from fp64.
    expect_close_abs("decode o", gpu.o, ref.o, 1e-4);
    expect_close_abs("decode lse", gpu.lse, ref.lse, 1e-5);
    expect_close_abs("appended k cache", kc_gpu, kc_cpu, 0.0);
    if (gates) expect_close_abs("appended g cache", gc_gpu, gc_cpu, 0.0);
}

TEST(SoftmaxCudaDecode, SingleTokenContiguous) {
    SKIP_WITHOUT_GPU();
    for (int64_t D : {64, 128, 256}) {
        SCOPED_TRACE(D);
        decode_case(false, 1, D, false, 0, 300);
    }
}
TEST(SoftmaxCudaDecode, SmallTqPagedGatesWindow) {
    SKIP_WITHOUT_GPU();
    decode_case(true, 3, 128, true, 50, 700);
}
TEST(SoftmaxCudaDecode, ChunkedPrefillPaged) {
    SKIP_WITHOUT_GPU();
    decode_case(true, 40, 128, true, 0, 2000);
}
TEST(SoftmaxCudaDecode, LongCacheSplits) {
    SKIP_WITHOUT_GPU();
    decode_case(false, 1, 128, true, 0, 5000);
}

#if HLA_WITH_CUDA
// The KV-cache decode step as a serving loop runs it: after one uncaptured call has sized the split
// workspace, the step (append, split attention, combine) is captured on a non-blocking stream into a
// CUDA graph. The capture fails if the step allocates, copies from the host or synchronises; the graph
// holds kernel nodes only, and its replay writes bit-for-bit what the eager step writes.
TEST(SoftmaxCudaDecode, CapturedInACudaGraphOnAUserStream) {
    SKIP_WITHOUT_GPU();
    const int64_t N = 4, HQ = 8, HKV = 2, D = 128, TC = 4096;
    const DType dt = DType::BF16;
    const Tensor kc0 = randn({N, TC, HKV, D}, dt, 11), vc0 = randn({N, TC, HKV, D}, dt, 12);
    const Tensor q = randn({N, 1, HQ, D}, dt, 13).to(Device::CUDA);
    const Tensor kn = randn({N, 1, HKV, D}, dt, 14).to(Device::CUDA);
    const Tensor vn = randn({N, 1, HKV, D}, dt, 15).to(Device::CUDA);
    Tensor lens_cpu({N}, DType::I32);
    const int32_t L[N] = {100, 3000, 0, 1700};  // 3000 keys: the cache is cut into splits, combined after
    std::copy(L, L + N, lens_cpu.ptr<int32_t>());
    const Tensor lens = lens_cpu.to(Device::CUDA);
    struct Run {
        Tensor kc, vc, o, lse;
    };
    auto fresh = [&] {
        return Run{kc0.to(Device::CUDA), vc0.to(Device::CUDA), poisoned({N, 1, HQ, D}, dt, Device::CUDA),
                   poisoned({N, HQ, 1}, DType::F32, Device::CUDA)};
    };
    auto step = [&](Run& r) {
        KVCacheOptions opt;
        opt.k = kn;
        opt.v = vn;
        opt.softmax_lse = r.lse;
        flash_attn_with_kvcache(q, r.kc, r.vc, lens, r.o, opt);
    };
    Run eager = fresh();
    step(eager);  // also sizes the split workspace
    cuda_synchronize();

    Run graphed = fresh();
    const GraphReplay g = capture_and_replay([&] { step(graphed); });
    ASSERT_EQ(g.capture, cudaSuccess) << "the KV-cache decode broke the stream capture: " << cudaGetErrorString(g.capture);
    EXPECT_GE(g.nodes, size_t(2)) << "append and attention at least";
    EXPECT_EQ(g.kernel_nodes, g.nodes) << "the KV-cache decode put a non-kernel node into the graph";
    ASSERT_EQ(g.replay, cudaSuccess) << cudaGetErrorString(g.replay);
    const std::tuple<const char*, const Tensor*, const Tensor*> outputs[] = {
        {"o", &eager.o, &graphed.o},
        {"lse", &eager.lse, &graphed.lse},
        {"k cache", &eager.kc, &graphed.kc},
        {"v cache", &eager.vc, &graphed.vc}};
    for (const auto& [what, a, b] : outputs) {
        const Tensor x = a->to(Device::CPU), y = b->to(Device::CPU);
        EXPECT_EQ(std::memcmp(x.data(), y.data(), x.nbytes()), 0) << "graph replay: " << what << " differs from eager";
    }
}
#endif

TEST(SoftmaxCuda, RejectsUnsupportedHeadDim) {
    SKIP_WITHOUT_GPU();
    Tensor q({1, 4, 2, 96}, DType::BF16, Device::CUDA), o({1, 4, 2, 96}, DType::BF16, Device::CUDA);
    try {
        flash_attn_func(q, q, q, o);
        ADD_FAILURE() << "no hla::Error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("head dim D = 96"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace hla::test::sm
