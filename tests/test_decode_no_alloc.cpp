// The decode step runs once per generated token: it must not touch the heap (DESIGN.md: "no
// allocation per call"), whichever pool thread runs which head. This binary replaces the global operator new to
// count allocations, so it is a test executable of its own.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "hla/hla.hpp"

static std::atomic<long> g_allocations{0};

void* operator new(std::size_t size) {
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(size ? size : 1)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

TEST(LinearDecode, NoAllocationPerCall) {
    const int64_t N = 2, T = 1, H = 4, HV = 8, K = 32, V = 32;
    for (hla::LinearConfig cfg : {hla::gated_delta_rule_config(), hla::kda_config(), hla::simple_gla_config()}) {
        cfg.backend = hla::Backend::Cpu;
        cfg.qk_l2norm = true;
        hla::Tensor q({N, T, H, K}, hla::DType::BF16), k({N, T, H, K}, hla::DType::BF16);
        hla::Tensor v({N, T, HV, V}, hla::DType::BF16), o({N, T, HV, V}, hla::DType::BF16);
        hla::Tensor beta({N, T, HV}, hla::DType::F32), state({4, HV, K, V}, hla::DType::F32);
        hla::Tensor slots({N}, hla::DType::I32);
        hla::Tensor g = cfg.decay == hla::Decay::Vector ? hla::Tensor({N, T, HV, K}, hla::DType::F32)
                                                        : hla::Tensor({N, T, HV}, hla::DType::F32);
        q.fill(0.1);
        k.fill(0.2);
        v.fill(0.3);
        g.fill(-0.1);
        beta.fill(0.5);
        state.fill(0.01);
        slots.ptr<int32_t>()[0] = 3;
        slots.ptr<int32_t>()[1] = 1;
        hla::LinearDecodeArgs a;
        a.q = q;
        a.k = k;
        a.v = v;
        a.g = g;
        if (cfg.update == hla::Update::Delta) a.beta = beta;
        a.state = state;
        a.state_indices = slots;
        a.o = o;
        hla::linear_decode(cfg, a);  // the pool's threads start on first use
        const long before = g_allocations.load();
        for (int step = 0; step < 50; ++step) hla::linear_decode(cfg, a);
        EXPECT_EQ(g_allocations.load() - before, 0) << "heap allocations in 50 decode steps";
    }
}

TEST(SoftmaxKVCacheDecode, NoAllocationPerCall) {
    // One new token per sequence appended to a paged cache and attended over it, with forget gates,
    // an output gate and a window: every option the per-token path can take.
    const int64_t N = 2, HQ = 4, HKV = 2, D = 64, pages = 6, page = 16, per_seq = 3;
    hla::Tensor q({N, 1, HQ, D}, hla::DType::BF16), k({N, 1, HKV, D}, hla::DType::BF16);
    hla::Tensor v({N, 1, HKV, D}, hla::DType::BF16), o({N, 1, HQ, D}, hla::DType::BF16);
    hla::Tensor k_cache({pages, page, HKV, D}, hla::DType::BF16), v_cache({pages, page, HKV, D}, hla::DType::BF16);
    hla::Tensor g_cache({pages, page, HQ}, hla::DType::F32), g({N, 1, HQ}, hla::DType::F32);
    hla::Tensor gate({N, 1, HQ, D}, hla::DType::F32), lens({N}, hla::DType::I32), table({N, per_seq}, hla::DType::I32);
    q.fill(0.1);
    k.fill(0.2);
    v.fill(0.3);
    k_cache.fill(0.2);
    v_cache.fill(0.3);
    g_cache.fill(-0.05);
    g.fill(-0.05);
    gate.fill(0.5);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < per_seq; ++b) table.ptr<int32_t>()[n * per_seq + b] = int32_t(n * per_seq + b);
    hla::SoftmaxConfig cfg;
    cfg.backend = hla::Backend::Cpu;
    cfg.window = 20;
    hla::SoftmaxKVCacheArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.g_cache = g_cache;
    a.g = g;
    a.gate = gate;
    a.cache_seqlens = lens;
    a.block_table = table;
    a.o = o;
    const auto step = [&](int32_t len) {
        for (int64_t n = 0; n < N; ++n) lens.ptr<int32_t>()[n] = len;
        hla::softmax_attention_kvcache(cfg, a);
    };
    step(10);  // the pool's threads start on first use
    const long before = g_allocations.load();
    for (int32_t len = 11; len < 40; ++len) step(len);
    EXPECT_EQ(g_allocations.load() - before, 0) << "heap allocations in 29 decode steps";
}

}  // namespace
