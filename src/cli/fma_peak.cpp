// Each thread keeps 12 independent accumulators acc ← acc · a + b in 64-byte vectors. One chain
// cannot reach the peak (an FMA has a latency of ~4 cycles and 2 pipes issue one each per cycle), so
// the chains are independent: 12 covers latency × pipes on every x86 core of the last decade. With
// -march=native on AVX-512 the vector is one zmm register; without, GCC splits it into halves,
// which still measures that machine's own peak. a < 1 and b > 0 keep the values bounded and normal
// (fixed point b / (1 − a)), so no denormal slows a pipe.
#include "cli/fma_peak.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace hla::cli {
namespace {

constexpr int kVecFloats = 16;
constexpr int kChains = 12;
typedef float vfloat __attribute__((vector_size(kVecFloats * sizeof(float))));

// fp-contract=fast lets GCC fuse a·x + b into one FMA whatever -std the build uses.
__attribute__((noinline, optimize("fp-contract=fast"))) float fma_chains(long iters, float seed) {
    vfloat acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = vfloat{} + (seed + 0.01f * float(c));
    const vfloat a = vfloat{} + 0.9999f;
    const vfloat b = vfloat{} + 1e-4f;
    for (long it = 0; it < iters; ++it) {
        // Without -ffast-math the compiler may not reassociate, so this stays 12 FMAs per iteration.
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    }
    vfloat s = acc[0];
    for (int c = 1; c < kChains; ++c) s += acc[c];
    float r = 0;
    for (int i = 0; i < kVecFloats; ++i) r += s[i];
    return r;
}

}  // namespace

// One timed run of `threads` threads for `seconds`; returns GFLOP/s over all of them.
static double fma_trial(int threads, double seconds) {
    using clock = std::chrono::steady_clock;
    // ~100 k iterations is ~1 ms per block: fine-grained enough to stop near the deadline.
    constexpr long kBlock = 100000;
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<long> blocks(static_cast<size_t>(threads), 0);
    std::vector<clock::time_point> finished(static_cast<size_t>(threads));
    std::vector<float> sink(static_cast<size_t>(threads));
    clock::time_point start, deadline;
    // Warm-up before the clock starts: clocks ramp, code is paged in.
    auto warm = [&](int id) { sink[size_t(id)] = fma_chains(kBlock, 1.0f); };
    auto timed = [&](int id) {
        long n = 0;
        float s = 0;
        while (clock::now() < deadline) {
            s += fma_chains(kBlock, 1.0f + 1e-3f * float(n % 7));
            ++n;
        }
        finished[size_t(id)] = clock::now();
        blocks[size_t(id)] = n;
        sink[size_t(id)] += s;
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i)
        pool.emplace_back([&, i] {
            warm(i);
            ready.fetch_add(1);
            while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
            timed(i);
        });
    warm(0);
    while (ready.load() < threads - 1) std::this_thread::yield();
    start = clock::now();
    deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
    go.store(true, std::memory_order_release);
    timed(0);
    for (auto& t : pool) t.join();
    const clock::time_point end = *std::max_element(finished.begin(), finished.end());
    long total_blocks = 0;
    for (long n : blocks) total_blocks += n;
    const double fmas = double(total_blocks) * kBlock * kChains * kVecFloats;
    return 2.0 * fmas / std::chrono::duration<double>(end - start).count() * 1e-9;
}

FmaPeak measure_fma_peak(int threads, double seconds) {
    // Best of short trials: a peak is what the machine can do, and on a shared machine another
    // process may hold a core for part of the time. One thread alone is measured too: with the other
    // cores busy elsewhere, `threads` × one thread is a better estimate of what `threads` idle cores
    // do. The larger is reported, so %peak errs low, never high.
    constexpr int kTrials = 4;
    FmaPeak r;
    r.threads = std::max(threads, 1);
    r.vector_floats = kVecFloats;
    const auto t0 = std::chrono::steady_clock::now();
    const double trial_s = seconds / (r.threads > 1 ? 2 * kTrials : kTrials);
    for (int i = 0; i < kTrials; ++i) r.all_threads_gflops = std::max(r.all_threads_gflops, fma_trial(r.threads, trial_s));
    r.one_thread_gflops = r.all_threads_gflops / r.threads;
    if (r.threads > 1)
        for (int i = 0; i < kTrials; ++i) r.one_thread_gflops = std::max(r.one_thread_gflops, fma_trial(1, trial_s));
    r.gflops = std::max(r.all_threads_gflops, r.threads * r.one_thread_gflops);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

}  // namespace hla::cli
