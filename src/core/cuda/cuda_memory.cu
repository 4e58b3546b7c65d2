// CUDA memory for hla::Tensor and the device query used by tests and the bench.
#include <cuda_runtime.h>

#include "core/cuda/stream.cuh"
#include "core/cuda_memory.hpp"
#include "hla/error.hpp"
#include "hla/tensor.hpp"

namespace hla {
namespace detail {

static void check(cudaError_t err, const char* what) {
    HLA_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

void* cuda_malloc(size_t bytes, int device_index) {
    check(cudaSetDevice(device_index), "cudaSetDevice");
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
}

void cuda_free(void* p) { cudaFree(p); }

// On hla's stream, then waited for: a copy out of a tensor that the caller's work on a non-blocking
// stream just wrote (cu_seqlens read back for checking, say) sees that work, which a plain
// cudaMemcpy on the legacy stream would not wait for.
void cuda_copy(void* dst, const void* src, size_t bytes) {
    const cudaStream_t stream = launch_stream();
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

}  // namespace detail

bool cuda_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device" error
        return false;
    }
    return n > 0;
}

void cuda_synchronize() { detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

}  // namespace hla
