// hla benchmarks — timing on a CUDA device, shared by the per-family CUDA benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "hla/tensor.hpp"

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
    for (int i = 0; i < 3; ++i) cudaGraphLaunch(exec, stream);
    cudaStreamSynchronize(stream);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
        cudaEventRecord(a, stream);
        cudaGraphLaunch(exec, stream);
        cudaEventRecord(b, stream);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        t.push_back(ms);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2] / steps;
}

}  // namespace hla::bench
