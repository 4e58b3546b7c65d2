// hla — raising a kernel's dynamic shared-memory limit above the 48 KiB default, once per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "hla/error.hpp"

namespace hla::detail {

// The device the next launch of this thread goes to.
inline int current_device(const char* op) {
    int device = 0;
    const cudaError_t e = cudaGetDevice(&device);
    HLA_CHECK(e == cudaSuccess, op, ": CUDA error in cudaGetDevice: ", cudaGetErrorString(e));
    return device;
}

// Raises Kernel's dynamic shared-memory limit to `bytes` on `device` (the limit is a per-device
// attribute of a kernel), once per device and process: the host call stays off every later launch.
// First calls racing on several threads both set the same value, which is harmless; a device index
// past 63 sets it on every call. Outside any stream, so a launch inside graph capture may call it.
template <auto Kernel>
void raise_smem_limit(int bytes, int device, const char* op, const char* what) {
    static std::atomic<uint64_t> raised{0};
    const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
    if (bit != 0 && (raised.load(std::memory_order_acquire) & bit) != 0) return;
    const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    HLA_CHECK(e == cudaSuccess, op, ": CUDA error in ", what, ": ", cudaGetErrorString(e));
    raised.fetch_or(bit, std::memory_order_release);
}

// The same on the current device.
template <auto Kernel>
void raise_smem_limit(size_t bytes, const char* op) {
    raise_smem_limit<Kernel>(int(bytes), current_device(op), op, "cudaFuncSetAttribute (shared memory)");
}

}  // namespace hla::detail
