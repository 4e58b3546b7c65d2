// hla — CUDA benchmark of the softmax family: forward, forward + backward and KV-cache decode, timed
// with CUDA events (median of many runs after a warm-up), against the two floors of each shape:
// flops / peak tensor rate and bytes / HBM bandwidth. bench/softmax_sdpa.py times PyTorch SDPA on the
// same shapes in the same device call.
//
// Usage: softmax_cuda_bench [--quick | --profile | --bwd]
//   --profile: one untimed call of each kernel on the issue-4 shapes, for a profiler (ncu) to catch.
//   --bwd:     only forward + backward at D = 128 (B=4 T=4096 and B=1 T=16384), 20 timed runs each:
//              several backward builds compared in one device call.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda_timing.hpp"
#include "hla/hla.hpp"

using namespace hla;
using hla::bench::median_ms;

namespace {

// Random bf16 in [−1, 1) without a per-element RNG call: a 64-bit LCG is plenty for timing inputs.
Tensor random_bf16(const std::vector<int64_t>& shape, uint64_t seed, float scale = 1.0f) {
    Tensor h(shape, DType::BF16);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    bf16* p = h.ptr<bf16>();
    for (int64_t i = 0; i < h.numel(); ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = float_to_bf16(scale * (float(x >> 40) / float(1ull << 24) * 2.0f - 1.0f));
    }
    return h.to(Device::CUDA);
}

// Attention flops (two matmuls, 2 flops a multiply-add) over the visible (query, key) pairs.
double attn_flops(int64_t B, int64_t H, int64_t T, int64_t D, int64_t window) {
    double pairs = 0;
    if (window <= 0 || window >= T)
        pairs = double(T) * double(T + 1) / 2;
    else
        pairs = double(window) * double(window + 1) / 2 + double(T - window) * double(window);
    return 4.0 * double(B) * double(H) * pairs * double(D);
}

struct Row {
    std::string what, shape;
    double ms, rate;
    const char* unit;
};
std::vector<Row> rows;

// gates: with the forget-gate bias and the sigmoid output gate (their cost over plain attention).
void bench_prefill(int64_t B, int64_t T, int64_t HQ, int64_t HKV, int64_t D, int64_t window, bool backward, int reps,
                   bool gates = false) {
    Tensor q = random_bf16({B, T, HQ, D}, 1), k = random_bf16({B, T, HKV, D}, 2), v = random_bf16({B, T, HKV, D}, 3);
    Tensor o({B, T, HQ, D}, DType::BF16, Device::CUDA), lse({B, HQ, T}, DType::F32, Device::CUDA);
    Tensor g, z;
    FlashAttnOptions opt;
    opt.window = window;
    opt.softmax_lse = lse;
    if (gates) {
        g = random_bf16({B, T, HQ}, 8, 0.05f);  // log forget gates around 0 (sign irrelevant for timing)
        z = random_bf16({B, T, HQ, D}, 9);
        opt.g = g;
        opt.gate = z;
    }
    char shape[160];
    std::snprintf(shape, sizeof shape, "B=%ld T=%ld HQ=%ld HKV=%ld D=%ld%s%s", long(B), long(T), long(HQ), long(HKV),
                  long(D), window > 0 ? (" w=" + std::to_string(window)).c_str() : "", gates ? " +g+gate" : "");
    const double fl = attn_flops(B, HQ, T, D, window);
    const double fwd = median_ms([&] { flash_attn_func(q, k, v, o, opt); }, reps);
    rows.push_back({"forward", shape, fwd, fl / fwd / 1e9, "TFLOP/s"});
    if (!backward) return;
    Tensor dout = random_bf16({B, T, HQ, D}, 4), dq({B, T, HQ, D}, DType::BF16, Device::CUDA),
           dk({B, T, HKV, D}, DType::BF16, Device::CUDA), dv({B, T, HKV, D}, DType::BF16, Device::CUDA);
    SoftmaxConfig cfg;
    cfg.window = window;
    SoftmaxForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.lse = lse;
    SoftmaxGrads grads;
    grads.dq = dq;
    grads.dk = dk;
    grads.dv = dv;
    Tensor dg, dz;
    if (gates) {
        a.g = g;
        a.gate = z;
        dg = Tensor({B, T, HQ}, DType::F32, Device::CUDA);
        dz = Tensor({B, T, HQ, D}, DType::BF16, Device::CUDA);
        grads.dg = dg;
        grads.dgate = dz;
    }
    const double fb = median_ms(
        [&] {
            flash_attn_func(q, k, v, o, opt);
            softmax_attention_backward(cfg, a, dout, grads);
        },
        reps);
    // forward + backward = 1 + 2.5 forwards of matmul work (FlashAttention's accounting).
    rows.push_back({"fwd+bwd", shape, fb, 3.5 * fl / fb / 1e9, "TFLOP/s"});
}

void bench_decode(int64_t N, int64_t L, int64_t HQ, int64_t HKV, int64_t D, int64_t TQ, int reps) {
    Tensor kc = random_bf16({N, L + TQ, HKV, D}, 5), vc = random_bf16({N, L + TQ, HKV, D}, 6);
    Tensor q = random_bf16({N, TQ, HQ, D}, 7);
    Tensor o({N, TQ, HQ, D}, DType::BF16, Device::CUDA);
    Tensor lens_h({N}, DType::I32);
    for (int64_t n = 0; n < N; ++n) lens_h.ptr<int32_t>()[n] = int32_t(L + TQ);
    Tensor lens = lens_h.to(Device::CUDA);
    const double ms = median_ms([&] { flash_attn_with_kvcache(q, kc, vc, lens, o); }, reps);
    const double bytes = 2.0 * double(N) * double(L + TQ) * double(HKV) * double(D) * 2.0;
    char shape[160];
    std::snprintf(shape, sizeof shape, "N=%ld L=%ld HQ=%ld HKV=%ld D=%ld TQ=%ld", long(N), long(L), long(HQ), long(HKV),
                  long(D), long(TQ));
    rows.push_back({"decode", shape, ms, bytes / ms / 1e6, "GB/s (KV)"});
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const bool profile = argc > 1 && std::strcmp(argv[1], "--profile") == 0;
    const bool bwd_only = argc > 1 && std::strcmp(argv[1], "--bwd") == 0;
    if (!cuda_available()) {
        std::printf("softmax_cuda_bench: no CUDA device\n");
        return 0;
    }
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    if (profile) {
        // median_ms with one repetition: a warm-up call and one timed call of each kernel.
        bench_prefill(4, 4096, 16, 16, 128, 0, true, 1);
        bench_decode(64, 4096, 32, 8, 128, 1, 1);
        bench_decode(64, 4096, 32, 8, 128, 4, 1);
        return 0;
    }
    const int reps = quick ? 5 : 20;
    bench_prefill(4, 4096, 16, 16, 128, 0, true, reps);
    bench_prefill(1, 16384, 16, 16, 128, 0, true, reps);
    if (bwd_only) {
        for (const Row& r : rows) std::printf("%-8s | %-44s | %9.3f\n", r.what.c_str(), r.shape.c_str(), r.ms);
        return 0;
    }
    bench_prefill(1, 16384, 16, 16, 128, 1024, true, reps);
    bench_prefill(4, 4096, 16, 16, 128, 0, true, reps, true);
    bench_prefill(2, 4096, 32, 8, 128, 0, false, reps);
    bench_prefill(4, 4096, 16, 16, 64, 0, false, reps);
    bench_prefill(2, 4096, 16, 16, 256, 0, true, reps);
    bench_decode(64, 4096, 32, 8, 128, 1, reps * 2);
    bench_decode(64, 4096, 32, 8, 128, 4, reps * 2);
    bench_decode(8, 32768, 32, 8, 128, 1, reps * 2);

    std::printf("\n%-8s | %-44s | %9s | %10s\n", "pass", "shape (bf16, causal)", "ms", "rate");
    std::printf("---------|----------------------------------------------|-----------|-----------\n");
    for (const Row& r : rows)
        std::printf("%-8s | %-44s | %9.3f | %7.1f %s\n", r.what.c_str(), r.shape.c_str(), r.ms, r.rate, r.unit);
    return 0;
}
