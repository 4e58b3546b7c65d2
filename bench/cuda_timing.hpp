// hla benchmarks — timing on a CUDA device, shared by the per-family CUDA benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace hla::bench {

// Median over `reps` runs of fn, in ms, measured with CUDA events on the default stream after three
// warm-up runs (module load and first-touch allocations stay out of the numbers).
inline double median_ms(const std::function<void()>& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn();
    cudaDeviceSynchronize();
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
        cudaEventRecord(a);
        fn();
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

}  // namespace hla::bench
