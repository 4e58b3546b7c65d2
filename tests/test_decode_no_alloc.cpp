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

}  // namespace
