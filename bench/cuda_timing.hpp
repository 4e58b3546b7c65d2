// hla benchmarks — timing on a CUDA device, shared by the per-family CUDA benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "hla/tensor.hpp"

namespace hla::bench {

// Median over `reps` runs of fn on `stream`, in ms, between two CUDA events recorded on it, after three
// warm-up runs (module load and first-touch allocations stay out of the numbers).
inline double median_event_ms(cudaStream_t stream, const std::function<void()>& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn();
    cudaStreamSynchronize(stream);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
        cudaEventRecord(a, stream);
        fn();
        cudaEventRecord(b, stream);
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

// Median time of one call of fn (which launches on the default stream), host-side work included.
inline double median_ms(const std::function<void()>& fn, int reps) {
    cudaDeviceSynchronize();
    return median_event_ms(nullptr, fn, reps);
}

// Kernel time of one call of a step the way an inference engine runs it: `steps` calls of fn captured
// into one CUDA graph on a stream of their own (so host-side argument checks and launch latency, which
// median_ms counts, drop out), the graph replayed `reps` times after three warm-ups; the median replay
// divided by `steps`, in ms. fn must be capturable (no allocation, host copy or synchronisation).
inline double graph_step_ms(const std::function<void()>& fn, int steps, int reps) {
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    cudaGraph_t graph;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    {
        CudaStreamScope on(stream);
        for (int i = 0; i < steps; ++i) fn();
    }
    cudaStreamEndCapture(stream, &graph);
    cudaGraphExec_t exec;
    cudaGraphInstantiate(&exec, graph, 0);
    const double ms = median_event_ms(stream, [&] { cudaGraphLaunch(exec, stream); }, reps);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    return ms / steps;
}

}  // namespace hla::bench
