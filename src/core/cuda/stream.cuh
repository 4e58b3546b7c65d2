// hla — the stream every CUDA launch, copy and workspace allocation of hla goes to.
#pragma once

#include <cuda_runtime.h>

#include "hla/tensor.hpp"

namespace hla::detail {

// This thread's hla::cuda_stream() (hla/tensor.hpp); nullptr is the legacy default stream.
inline cudaStream_t launch_stream() { return static_cast<cudaStream_t>(cuda_stream()); }

}  // namespace hla::detail
