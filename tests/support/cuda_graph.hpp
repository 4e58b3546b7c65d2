// hla tests — capturing a step into a CUDA graph the way an inference engine does, for the tests that
// check that the decode steps are capturable.
#pragma once

#if HLA_WITH_CUDA
#include <cuda_runtime.h>

#include <functional>
#include <vector>

#include "hla/tensor.hpp"

namespace hla::test {

// What capturing fn once and replaying the graph showed.
struct GraphReplay {
    cudaError_t capture = cudaSuccess;  // of ending the capture: fails if fn allocated, copied from the
                                        // host or synchronised
    size_t nodes = 0, kernel_nodes = 0;
    cudaError_t replay = cudaSuccess;   // of the replay, waited for
};

// Captures fn (thread-local mode) on a fresh non-blocking stream with hla's stream pointed at it for
// the capture (CudaStreamScope), then replays the graph once and waits for it. fn's exceptions pass.
inline GraphReplay capture_and_replay(const std::function<void()>& fn) {
    GraphReplay r;
    cudaStream_t stream = nullptr;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    cudaGraph_t graph = nullptr;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    try {
        CudaStreamScope on(stream);
        fn();
    } catch (...) {
        cudaStreamEndCapture(stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        cudaStreamDestroy(stream);
        throw;
    }
    r.capture = cudaStreamEndCapture(stream, &graph);
    if (r.capture == cudaSuccess) {
        cudaGraphGetNodes(graph, nullptr, &r.nodes);
        std::vector<cudaGraphNode_t> nodes(r.nodes);
        cudaGraphGetNodes(graph, nodes.data(), &r.nodes);
        for (cudaGraphNode_t node : nodes) {
            cudaGraphNodeType type;
            if (cudaGraphNodeGetType(node, &type) == cudaSuccess && type == cudaGraphNodeTypeKernel) ++r.kernel_nodes;
        }
        cudaGraphExec_t exec = nullptr;
        r.replay = cudaGraphInstantiate(&exec, graph, 0);
        if (r.replay == cudaSuccess) r.replay = cudaGraphLaunch(exec, stream);
        if (r.replay == cudaSuccess) r.replay = cudaStreamSynchronize(stream);
        if (exec) cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
    }
    cudaStreamDestroy(stream);
    return r;
}

}  // namespace hla::test
#endif
